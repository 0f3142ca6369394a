//! The io_uring mechanism of the raw engine: reads, writes (FUA as write then fdatasync) and
//! flushes go through one ring, submitted in a batch by `kick`; the ring signals the engine's
//! eventfd on every completion.
//!
//! Each request owns a slot (indexed by the entry's `user_data`) holding the request, its
//! segments and its iovec array until the last entry for it completes; short transfers are
//! resubmitted for the remainder.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use io_uring::IoUring;
use nix::sys::eventfd::EventFd;

use super::raw::Files;
use super::sys::{self, IoVecs};
use super::{Completion, IoOp, IoRequest};

struct Slot {
    req: Option<IoRequest>,
    iov: IoVecs,
    total: u64,
    done: u64,
    syncing: bool,
    buffered: bool,
}

/// A ring and its request slots.
pub(crate) struct Uring {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<u32>,
    cqes: Vec<(u64, i32)>,
    unsubmitted: usize,
}

impl Uring {
    /// A ring for `depth` requests that signals `efd`.
    pub(crate) fn new(depth: u32, efd: &EventFd) -> io::Result<Uring> {
        let depth = depth.clamp(1, super::MAX_QUEUE_DEPTH);
        let ring = IoUring::new(depth.next_power_of_two())?;
        ring.submitter().register_eventfd(efd.as_fd().as_raw_fd())?;
        let slots = (0..depth)
            .map(|_| Slot {
                req: None,
                iov: IoVecs::with_capacity(16),
                total: 0,
                done: 0,
                syncing: false,
                buffered: false,
            })
            .collect();
        Ok(Uring {
            ring,
            slots,
            free: (0..depth).rev().collect(),
            cqes: Vec::with_capacity(depth as usize * 2),
            unsubmitted: 0,
        })
    }

    /// Puts a validated Read, Write or Flush of `total` bytes on the submission queue. On
    /// failure the request comes back with an errno.
    pub(crate) fn start(
        &mut self,
        files: &Files,
        req: IoRequest,
        buffered: bool,
        total: u64,
    ) -> Result<(), (IoRequest, i32)> {
        let Some(idx) = self.free.pop() else {
            return Err((req, libc::EBUSY));
        };
        let slot = &mut self.slots[idx as usize];
        slot.total = total;
        slot.done = 0;
        slot.syncing = false;
        slot.buffered = buffered;
        slot.iov.fill(&req.segs);
        slot.req = Some(req);
        if let Err(errno) = self.push_phase(files, idx) {
            let slot = &mut self.slots[idx as usize];
            slot.iov.clear();
            self.free.push(idx);
            let req = slot.req.take();
            return match req {
                Some(r) => Err((r, errno)),
                None => Ok(()),
            };
        }
        Ok(())
    }

    /// Pushes the next entry for slot `idx` (data at the current position, or the sync).
    fn push_phase(&mut self, files: &Files, idx: u32) -> Result<(), i32> {
        let slot = &self.slots[idx as usize];
        let Some(req) = slot.req.as_ref() else {
            return Err(libc::EINVAL);
        };
        let pushed = if slot.syncing || req.op == IoOp::Flush {
            sys::push_fdatasync(&mut self.ring, files.main().as_fd(), u64::from(idx))
        } else {
            sys::push_rw(
                &mut self.ring,
                files.pick(slot.buffered).as_fd(),
                &slot.iov,
                req.offset + slot.done,
                req.op == IoOp::Write,
                u64::from(idx),
            )
        };
        match pushed {
            Ok(()) => {
                self.unsubmitted += 1;
                Ok(())
            }
            Err(_) => Err(libc::EBUSY),
        }
    }

    /// Submits everything pushed since the last call (one syscall).
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(n) => {
                    // Entries the kernel did not take stay in the queue for the next call.
                    let left = self.ring.submission().len();
                    self.unsubmitted = left;
                    if left > 0 && n == 0 {
                        return Err(io::Error::from_raw_os_error(libc::EAGAIN));
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Slots in use.
    pub(crate) fn busy(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Processes the completion queue: finished requests go to `out`, short transfers and FUA
    /// syncs are resubmitted. Returns how many requests finished.
    pub(crate) fn reap(&mut self, files: &Files, out: &mut Vec<Completion>) -> io::Result<usize> {
        self.cqes.clear();
        self.cqes
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let mut finished = 0;
        for i in 0..self.cqes.len() {
            let (ud, res) = self.cqes[i];
            let Some(idx) = u32::try_from(ud)
                .ok()
                .filter(|&i| (i as usize) < self.slots.len())
            else {
                tracing::error!(user_data = ud, "io_uring: completion for an unknown slot");
                continue;
            };
            let next = self.advance(idx, res, files.has_buffered());
            let result = match next {
                Next::Done(r) => Some(r),
                Next::Again => self.push_phase(files, idx).err().map(Err),
            };
            if let Some(result) = result {
                self.finish(idx, result, out);
                finished += 1;
            }
        }
        self.submit()?;
        Ok(finished)
    }

    fn advance(&mut self, idx: u32, res: i32, has_buffered: bool) -> Next {
        let slot = &mut self.slots[idx as usize];
        let Some(req) = slot.req.as_ref() else {
            return Next::Done(Err(libc::EIO));
        };
        if res == -libc::EAGAIN || res == -libc::EINTR {
            return Next::Again;
        }
        if res == -libc::EFAULT && !slot.syncing && !slot.buffered && has_buffered {
            // Memory O_DIRECT cannot pin (some foreign or device mappings): the page cache
            // path copies instead. Go on from where the transfer stopped.
            slot.buffered = true;
            return Next::Again;
        }
        if res < 0 {
            return Next::Done(Err(-res));
        }
        if slot.syncing || req.op == IoOp::Flush {
            return Next::Done(Ok(slot.total));
        }
        let n = u64::from(res.unsigned_abs());
        slot.done += n;
        if slot.done >= slot.total {
            if req.fua && req.op == IoOp::Write {
                slot.syncing = true;
                return Next::Again;
            }
            return Next::Done(Ok(slot.total));
        }
        if n == 0 {
            // End of file inside a validated range: the file shrank under us.
            return Next::Done(Err(libc::EIO));
        }
        slot.iov.advance(n as usize);
        Next::Again
    }

    fn finish(&mut self, idx: u32, result: Result<u64, i32>, out: &mut Vec<Completion>) {
        let slot = &mut self.slots[idx as usize];
        slot.iov.clear();
        if let Some(mut req) = slot.req.take() {
            req.segs.clear();
            out.push(Completion {
                tag: req.tag,
                result,
                segs: req.segs,
            });
        }
        self.free.push(idx);
    }
}

enum Next {
    Done(Result<u64, i32>),
    Again,
}

impl Drop for Uring {
    fn drop(&mut self) {
        // The kernel may still be using slot memory: wait for every entry in flight before the
        // slots (and the segments they hold) are freed.
        let mut in_ring = self.slots.iter().filter(|s| s.req.is_some()).count();
        while in_ring > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!(error = %e, "io_uring: cannot wait for in-flight I/O; leaking its memory");
                    for s in &mut self.slots {
                        if let Some(r) = s.req.take() {
                            std::mem::forget(r);
                        }
                    }
                    return;
                }
            }
            for c in self.ring.completion() {
                let idx = c.user_data() as usize;
                if let Some(s) = self.slots.get_mut(idx) {
                    if s.req.take().is_some() {
                        in_ring -= 1;
                    }
                }
            }
        }
    }
}

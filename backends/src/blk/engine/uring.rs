//! The io_uring mechanism of the raw engine: reads, writes (FUA as write then fdatasync) and
//! flushes go through one ring, submitted in a batch by `kick`; the ring signals the engine's
//! eventfd when completions are waiting.
//!
//! Each request owns a slot (indexed by the entry's `user_data`) holding the request, its
//! segments and its iovec array until the last entry for it completes; short transfers are
//! resubmitted for the remainder.
//!
//! **Deferred task work.** Where the kernel has it (Linux 6.1+), the ring is set up as fio
//! sets up its own: `IORING_SETUP_DEFER_TASKRUN` with `SINGLE_ISSUER`, `COOP_TASKRUN` and
//! `TASKRUN_FLAG`. A finished read then only queues its completion work and signals the
//! eventfd; the work runs, for the whole batch, when the engine's thread next enters the ring
//! to reap. Without it every completion interrupts the thread (task work) and restarts its
//! poll: measured on this VM, 4 KiB random reads at QD32 went from 0.86-0.88x fio to
//! 0.90-0.92x fio with the engine alone (docs/PERFORMANCE.md). `DOMIO_URING_DEFER=0` turns it
//! off for comparisons.
//!
//! Such a ring belongs to one thread: only the thread that enabled it may submit or run its
//! completions. Engines are opened on one thread (the XenBus probe, the machine setup) and
//! used on another (a ring or queue thread, a new one after a virtio reset), so the ring is
//! created disabled and enabled by the first thread that uses it, and a thread that takes the
//! engine over gets a ring of its own. Requests still in flight on the old ring can never be
//! reaped by the new thread (the kernel keeps their completion work for the old one): they
//! complete at once with EIO, their memory is deliberately leaked (the device may still write
//! it), and the old ring is closed, which lets the kernel finish them. Our callers hand an
//! engine on only after draining it (virtio-blk waits 30 s), so this is the hung-I/O case.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::thread::ThreadId;

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

/// How a ring runs the kernel's completion work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TaskRun {
    /// `IORING_SETUP_DEFER_TASKRUN`: run in one batch when the owning thread reaps.
    Deferred,
    /// Run by the kernel as each request finishes (kernels before 6.1, or turned off).
    Immediate,
}

/// A ring and its request slots.
pub(crate) struct Uring {
    ring: IoUring,
    taskrun: TaskRun,
    /// The thread that enabled `ring` (deferred mode; `None` until the first use).
    owner: Option<ThreadId>,
    /// Requests written off when another thread took the engine over, for the next reap.
    orphaned: Vec<Completion>,
    entries: u32,
    efd: Arc<EventFd>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    cqes: Vec<(u64, i32)>,
    unsubmitted: usize,
    /// One-segment transfers use IORING_OP_READ/WRITE (no iovec for the kernel to copy in),
    /// as fio does; off where the kernel lacks them or `DOMIO_URING_VECTORED=1`.
    plain_rw: bool,
}

/// Whether the ring knows IORING_OP_READ and IORING_OP_WRITE (Linux 5.6) and they are wanted.
fn plain_rw_supported(ring: &IoUring) -> bool {
    if std::env::var("DOMIO_URING_VECTORED").as_deref() == Ok("1") {
        return false;
    }
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).is_ok()
        && probe.is_supported(io_uring::opcode::Read::CODE)
        && probe.is_supported(io_uring::opcode::Write::CODE)
}

thread_local! {
    static THIS_THREAD: ThreadId = std::thread::current().id();
}

/// The calling thread's id, without the `Arc` clone of `thread::current()` (claim runs per
/// request).
fn this_thread() -> ThreadId {
    THIS_THREAD.with(|id| *id)
}

/// Whether deferred task work is wanted (`DOMIO_URING_DEFER=0` turns it off).
fn want_deferred() -> bool {
    std::env::var("DOMIO_URING_DEFER").as_deref() != Ok("0")
}

/// A ring of `entries` that signals `efd`: deferred and disabled (enabled by its first user)
/// where the kernel allows it and `deferred` asks for it, else an ordinary enabled ring.
fn build(entries: u32, efd: &EventFd, deferred: bool) -> io::Result<(IoUring, TaskRun)> {
    let fd = efd.as_fd().as_raw_fd();
    if deferred {
        let mut b = IoUring::builder();
        b.setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_r_disabled();
        match b.build(entries) {
            Ok(ring) => {
                ring.submitter().register_eventfd(fd)?;
                return Ok((ring, TaskRun::Deferred));
            }
            // A kernel without these flags: an ordinary ring.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    let ring = IoUring::new(entries)?;
    ring.submitter().register_eventfd(fd)?;
    Ok((ring, TaskRun::Immediate))
}

impl Uring {
    /// A ring for `depth` requests that signals `efd`.
    pub(crate) fn new(depth: u32, efd: &Arc<EventFd>) -> io::Result<Uring> {
        let depth = depth.clamp(1, super::MAX_QUEUE_DEPTH);
        let entries = depth.next_power_of_two();
        let (ring, taskrun) = build(entries, efd, want_deferred())?;
        let plain_rw = plain_rw_supported(&ring);
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
            taskrun,
            owner: None,
            orphaned: Vec::new(),
            entries,
            efd: efd.clone(),
            slots,
            free: (0..depth).rev().collect(),
            cqes: Vec::with_capacity(depth as usize * 2),
            plain_rw,
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
        // Before a slot is taken: a takeover writes off every request in a slot.
        if let Err(e) = self.claim() {
            return Err((req, e.raw_os_error().unwrap_or(libc::EIO)));
        }
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

    /// How this ring runs completion work.
    pub(crate) fn taskrun(&self) -> TaskRun {
        self.taskrun
    }

    /// Makes the calling thread the ring's user (deferred mode): enables the ring on first
    /// use, or gives a thread that took the engine over a ring of its own, writing off what
    /// was in flight on the old one (see the module documentation).
    fn claim(&mut self) -> io::Result<()> {
        if self.taskrun != TaskRun::Deferred {
            return Ok(());
        }
        let me = this_thread();
        match self.owner {
            Some(o) if o == me => return Ok(()),
            None => {
                self.ring.submitter().register_enable_rings()?;
                self.owner = Some(me);
                return Ok(());
            }
            Some(_) => {}
        }
        let (fresh, taskrun) = build(self.entries, &self.efd, true)?;
        if taskrun == TaskRun::Deferred {
            fresh.submitter().register_enable_rings()?;
        }
        let unsent = self.ring.submission().len();
        let old = std::mem::replace(&mut self.ring, fresh);
        self.taskrun = taskrun;
        self.owner = Some(me);
        self.unsubmitted = 0;
        let mut lost = 0;
        for idx in 0..self.slots.len() {
            let slot = &mut self.slots[idx];
            let Some(mut req) = slot.req.take() else {
                continue;
            };
            // The kernel may still write these pages: never give them back.
            std::mem::forget(std::mem::take(&mut req.segs));
            slot.iov.clear();
            self.orphaned.push(Completion {
                tag: req.tag,
                result: Err(libc::EIO),
                segs: Vec::new(),
            });
            self.free.push(idx as u32);
            lost += 1;
        }
        // Closing the old ring lets the kernel finish (or cancel) what it still holds.
        drop(old);
        if lost > 0 || unsent > 0 {
            tracing::warn!(
                in_flight = lost,
                unsent,
                "io_uring: another thread took the engine over with requests in flight; they \
                 fail with EIO and their memory is left to the kernel"
            );
            let _ = self.efd.write(1);
        } else {
            tracing::debug!(
                "io_uring: the engine moved to another thread; it has a ring of its own"
            );
        }
        Ok(())
    }

    /// Pushes the next entry for slot `idx` (data at the current position, or the sync).
    fn push_phase(&mut self, files: &Files, idx: u32) -> Result<(), i32> {
        // Both callers (start, and reap's resubmissions after collect) have claimed the ring.
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
                self.plain_rw,
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
        if self.unsubmitted > 0 {
            self.claim()?;
        }
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
        self.collect()?;
        let mut finished = self.orphaned.len();
        out.append(&mut self.orphaned);
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

    /// Moves every posted completion into `cqes`: in deferred mode the owner first enters the
    /// ring to run the completion work waiting for it (one syscall per reap, as fio's
    /// GETEVENTS).
    fn collect(&mut self) -> io::Result<()> {
        if self.taskrun == TaskRun::Deferred && self.busy() > 0 {
            self.claim()?;
            loop {
                match sys::run_deferred_completions(&self.ring) {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        self.cqes
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        Ok(())
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
        // slots (and the segments they hold) are freed. A thread that did not own a deferred
        // ring first takes it over, which writes off what the old owner left in flight.
        let claimed = self.claim();
        let mut in_ring = self.slots.iter().filter(|s| s.req.is_some()).count();
        while in_ring > 0 {
            let waited = match &claimed {
                Ok(()) => self.ring.submit_and_wait(1),
                Err(e) => Err(io::Error::from(e.kind())),
            };
            if let Err(e) = waited {
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

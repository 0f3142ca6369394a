//! Worker threads for blocking I/O: the raw engine's fallback mechanism when io_uring is
//! unavailable, and its helper for operations io_uring does not cover (discards, write-zeroes).
//!
//! Jobs go to the workers on an MPMC channel; each finished job comes back on a second
//! channel, followed by a write to the engine's completion eventfd (in that order, so a reader
//! that resets the eventfd before draining the channel never misses a completion).

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use nix::sys::eventfd::EventFd;

use super::raw::{execute, Files};
use super::sys::IoVecs;
use super::{Completion, EngineError, IoRequest};

/// One request for a worker.
pub(crate) struct Job {
    pub(crate) req: IoRequest,
    pub(crate) files: Arc<Files>,
    /// Use the buffered descriptor (the request is not aligned for O_DIRECT).
    pub(crate) buffered: bool,
}

/// A fixed set of worker threads.
pub(crate) struct Pool {
    tx: Option<Sender<Job>>,
    done: Receiver<Completion>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `n` workers (at least one) that signal `efd` after each completion.
    pub(crate) fn new(n: usize, efd: Arc<EventFd>, name: &str) -> Result<Pool, EngineError> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done) = crossbeam_channel::unbounded::<Completion>();
        let mut threads = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rx = rx.clone();
            let done_tx = done_tx.clone();
            let efd = efd.clone();
            let t = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker(&rx, &done_tx, &efd))
                .map_err(|e| EngineError::Io {
                    op: "spawn I/O worker",
                    source: e,
                })?;
            threads.push(t);
        }
        Ok(Pool {
            tx: Some(tx),
            done,
            threads,
        })
    }

    /// Hands a job to the workers.
    pub(crate) fn submit(&self, job: Job) {
        if let Some(tx) = &self.tx {
            // The workers hold the receiver until the pool is dropped, so this cannot fail
            // while `self` is alive.
            let _ = tx.send(job);
        }
    }

    /// Moves finished jobs into `out`; returns how many.
    pub(crate) fn drain(&self, out: &mut Vec<Completion>) -> usize {
        let mut n = 0;
        while let Ok(c) = self.done.try_recv() {
            out.push(c);
            n += 1;
        }
        n
    }

    /// Worker threads.
    pub(crate) fn threads(&self) -> usize {
        self.threads.len()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the job channel ends the workers once they have finished (and released the
        // segments of) every job already sent.
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(rx: &Receiver<Job>, done: &Sender<Completion>, efd: &EventFd) {
    let mut iov = IoVecs::with_capacity(32);
    while let Ok(mut job) = rx.recv() {
        let result = execute(&job.files, job.buffered, &job.req, &mut iov);
        iov.clear();
        job.req.segs.clear();
        let c = Completion {
            tag: job.req.tag,
            result,
            segs: job.req.segs,
        };
        if done.send(c).is_err() {
            return;
        }
        if let Err(e) = efd.write(1) {
            tracing::error!(error = %e, "storage worker: completion eventfd write failed");
        }
    }
}

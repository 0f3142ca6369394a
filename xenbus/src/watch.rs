//! Watch events: a bounded, coalescing queue (XSA-349).
//!
//! A guest that floods writes to a node we watch must not grow our memory. Each
//! [`EventQueue`] holds at most `capacity` pending events; an event whose `(token, path)` is
//! already pending is dropped (the consumer re-reads current values anyway), and when the
//! queue is full a new event is replaced by one *overflow* marker per watch, whose path is the
//! watched path itself: "something under here changed, rescan it". Memory per queue is
//! therefore bounded by `capacity` paths plus one marker per watch.
//!
//! Several watches may feed one queue (the backend lifecycle uses one queue for the backend
//! directory and every frontend `state` node), so one thread can wait on all of them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use crossbeam_channel::RecvTimeoutError;

/// Default number of pending events per queue.
pub const DEFAULT_WATCH_QUEUE_CAPACITY: usize = 256;

/// One watch event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path that changed (or, for an overflow marker, the watched path).
    pub path: String,
    /// The token given when the watch was set.
    pub token: String,
    /// The queue overflowed and events for this watch were dropped: re-read everything under
    /// `path`.
    pub overflowed: bool,
}

/// Counters of a queue, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Events currently pending (including overflow markers).
    pub pending: usize,
    /// Events dropped because the same (token, path) was already pending.
    pub coalesced: u64,
    /// Events dropped because the queue was full.
    pub overflowed: u64,
    /// Events delivered to the consumer.
    pub delivered: u64,
    /// The most events ever pending at once.
    pub max_pending: usize,
}

#[derive(Debug, Default)]
struct QState {
    pending: VecDeque<(Arc<str>, String)>,
    keys: HashSet<(Arc<str>, String)>,
    /// token -> watched path, for watches that lost events.
    overflow: HashMap<Arc<str>, Arc<str>>,
    closed: Option<String>,
    stats: QueueStats,
}

#[derive(Debug)]
struct QueueInner {
    state: Mutex<QState>,
    cond: Condvar,
    capacity: usize,
}

/// A bounded, coalescing queue of watch events. Cloning gives another handle to the same
/// queue.
#[derive(Debug, Clone)]
pub struct EventQueue {
    inner: Arc<QueueInner>,
}

impl EventQueue {
    /// A queue holding at most `capacity` pending events (at least 1).
    pub fn new(capacity: usize) -> EventQueue {
        EventQueue {
            inner: Arc::new(QueueInner {
                state: Mutex::new(QState::default()),
                cond: Condvar::new(),
                capacity: capacity.max(1),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QState> {
        // A panic while holding this lock cannot leave the state inconsistent (every
        // mutation is a single collection operation), so a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues an event for the watch `token` on `watched`; returns false if it was coalesced,
    /// replaced by an overflow marker, or the queue is closed.
    pub(crate) fn push(&self, token: &Arc<str>, watched: &Arc<str>, path: &str) -> bool {
        let mut st = self.lock();
        if st.closed.is_some() {
            return false;
        }
        if st.overflow.contains_key(token) {
            // A rescan of this watch is already pending: it covers this path.
            st.stats.coalesced += 1;
            return false;
        }
        let key = (Arc::clone(token), path.to_owned());
        if st.keys.contains(&key) {
            st.stats.coalesced += 1;
            return false;
        }
        if st.pending.len() >= self.inner.capacity {
            st.stats.overflowed += 1;
            st.overflow.insert(Arc::clone(token), Arc::clone(watched));
            st.stats.pending = st.pending.len() + st.overflow.len();
            st.stats.max_pending = st.stats.max_pending.max(st.stats.pending);
            drop(st);
            self.inner.cond.notify_one();
            return false;
        }
        st.keys.insert(key.clone());
        st.pending.push_back(key);
        st.stats.pending = st.pending.len() + st.overflow.len();
        st.stats.max_pending = st.stats.max_pending.max(st.stats.pending);
        drop(st);
        self.inner.cond.notify_one();
        true
    }

    fn take(st: &mut QState) -> Option<WatchEvent> {
        // Overflow markers first: they subsume the pending events of their watch.
        let ev = if let Some(token) = st.overflow.keys().next().cloned() {
            let watched = st.overflow.remove(&token)?;
            Some(WatchEvent {
                path: watched.to_string(),
                token: token.to_string(),
                overflowed: true,
            })
        } else if let Some((token, path)) = st.pending.pop_front() {
            st.keys.remove(&(Arc::clone(&token), path.clone()));
            Some(WatchEvent {
                path,
                token: token.to_string(),
                overflowed: false,
            })
        } else {
            None
        };
        if ev.is_some() {
            st.stats.delivered += 1;
            st.stats.pending = st.pending.len() + st.overflow.len();
        }
        ev
    }

    /// The next event, if one is pending.
    pub fn try_recv(&self) -> Option<WatchEvent> {
        Self::take(&mut self.lock())
    }

    /// Waits for the next event; `None` once the queue is closed and drained.
    pub fn recv(&self) -> Option<WatchEvent> {
        let mut st = self.lock();
        loop {
            if let Some(ev) = Self::take(&mut st) {
                return Some(ev);
            }
            if st.closed.is_some() {
                return None;
            }
            st = self
                .inner
                .cond
                .wait(st)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Waits at most `timeout` for the next event.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<WatchEvent, RecvTimeoutError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(ev) = Self::take(&mut st) {
                return Ok(ev);
            }
            if st.closed.is_some() {
                return Err(RecvTimeoutError::Disconnected);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RecvTimeoutError::Timeout);
            }
            st = self
                .inner
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Closes the queue: pending events can still be taken, then `recv` returns `None`.
    /// The first reason given is kept.
    pub fn close(&self, reason: &str) {
        let mut st = self.lock();
        if st.closed.is_none() {
            st.closed = Some(reason.to_owned());
        }
        drop(st);
        self.inner.cond.notify_all();
    }

    /// Why the queue was closed, if it was.
    pub fn closed_reason(&self) -> Option<String> {
        self.lock().closed.clone()
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.lock().stats
    }

    /// The maximum number of pending events.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn test_queue_same_path_twice_is_coalesced() {
        let q = EventQueue::new(8);
        let (t, w) = (tok("t"), tok("/a"));
        assert!(q.push(&t, &w, "/a/state"));
        assert!(!q.push(&t, &w, "/a/state"));
        assert_eq!(q.try_recv().map(|e| e.path), Some("/a/state".to_owned()));
        assert!(q.try_recv().is_none());
        assert_eq!(q.stats().coalesced, 1);
    }

    #[test]
    fn test_queue_flood_of_distinct_paths_stays_bounded_and_reports_overflow() {
        // Arrange
        let q = EventQueue::new(4);
        let (t, w) = (tok("t"), tok("/dir"));
        // Act
        for i in 0..100_000 {
            q.push(&t, &w, &format!("/dir/{i}"));
        }
        // Assert
        let st = q.stats();
        assert!(st.pending <= 5, "{st:?}");
        let first = q.try_recv().unwrap();
        assert!(first.overflowed);
        assert_eq!(first.path, "/dir");
        let rest: Vec<_> = std::iter::from_fn(|| q.try_recv()).collect();
        assert_eq!(rest.len(), 4);
        assert!(rest.iter().all(|e| !e.overflowed));
    }

    #[test]
    fn test_queue_other_watch_keeps_its_events_when_one_overflows() {
        let q = EventQueue::new(2);
        let (a, b) = (tok("a"), tok("b"));
        let (wa, wb) = (tok("/a"), tok("/b"));
        q.push(&b, &wb, "/b/x");
        for i in 0..10 {
            q.push(&a, &wa, &format!("/a/{i}"));
        }
        let evs: Vec<_> = std::iter::from_fn(|| q.try_recv()).collect();
        assert!(evs.iter().any(|e| e.token == "a" && e.overflowed));
        assert!(evs.iter().any(|e| e.token == "b" && e.path == "/b/x"));
    }

    #[test]
    fn test_queue_close_wakes_blocked_receiver() {
        let q = EventQueue::new(2);
        let q2 = q.clone();
        let h = std::thread::spawn(move || q2.recv());
        q.close("test");
        assert_eq!(h.join().unwrap(), None);
        assert_eq!(q.closed_reason().as_deref(), Some("test"));
        assert_eq!(
            q.recv_timeout(Duration::from_millis(1)),
            Err(RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn test_queue_recv_timeout_without_events_times_out() {
        let q = EventQueue::new(2);
        assert_eq!(
            q.recv_timeout(Duration::from_millis(10)),
            Err(RecvTimeoutError::Timeout)
        );
    }
}

//! Connections: one reader thread and one writer thread per client, and the bounded
//! outgoing queue between the server and the writer.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use xen::abi::xs_wire::{msg, XsdSockmsg};
use xenbus::wire::{Message, WireError};
use zerocopy::IntoBytes;

use super::Xenstored;

/// Outstanding replies a privileged connection may leave unread before we stop reading
/// its requests (cxenstored has no limit for dom0; we keep memory bounded anyway).
pub(crate) const PRIVILEGED_OUTSTANDING: usize = 1024;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum Out {
    Reply(Vec<u8>),
    Event { bytes: Vec<u8>, at: Instant },
}

#[derive(Default)]
struct OutInner {
    queue: VecDeque<Out>,
    /// Replies queued or being written.
    replies: usize,
    /// Bytes of queued events.
    event_bytes: usize,
    /// Queued events, for dropping duplicates.
    pending_events: HashSet<Vec<u8>>,
    closed: bool,
    dropped_events: u64,
}

/// What the server has to send to one client.
pub(crate) struct Outbox {
    inner: Mutex<OutInner>,
    cv: Condvar,
    event_budget: usize,
    event_timeout: Duration,
}

impl Outbox {
    pub fn new(event_budget: usize, event_timeout: Duration) -> Self {
        Outbox {
            inner: Mutex::new(OutInner::default()),
            cv: Condvar::new(),
            event_budget,
            event_timeout,
        }
    }

    pub fn push_reply(&self, m: &Message) {
        let mut bytes = Vec::new();
        if m.encode_into(&mut bytes).is_err() {
            return;
        }
        let mut g = lock(&self.inner);
        if g.closed {
            return;
        }
        g.replies += 1;
        g.queue.push_back(Out::Reply(bytes));
        self.cv.notify_all();
    }

    /// Queues a watch event. Dropped (and counted) if an identical event is already
    /// queued, or if the queued events already use the connection's budget.
    pub fn push_event(&self, payload: Vec<u8>) {
        let hdr = XsdSockmsg {
            type_: msg::XS_WATCH_EVENT,
            req_id: 0,
            tx_id: 0,
            len: payload.len() as u32,
        };
        let mut g = lock(&self.inner);
        if g.closed {
            return;
        }
        if g.pending_events.contains(&payload)
            || g.event_bytes + payload.len() + hdr.as_bytes().len() > self.event_budget
        {
            g.dropped_events += 1;
            return;
        }
        let mut bytes = Vec::with_capacity(16 + payload.len());
        bytes.extend_from_slice(hdr.as_bytes());
        bytes.extend_from_slice(&payload);
        g.event_bytes += bytes.len();
        g.pending_events.insert(payload);
        g.queue.push_back(Out::Event {
            bytes,
            at: Instant::now(),
        });
        self.cv.notify_all();
    }

    /// Waits until fewer than `limit` replies are unsent; false once closed.
    fn wait_below(&self, limit: usize) -> bool {
        let mut g = lock(&self.inner);
        while !g.closed && g.replies >= limit {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        !g.closed
    }

    /// The next bytes to write and whether they are a reply; None once closed.
    fn pop(&self) -> Option<(Vec<u8>, bool)> {
        let mut g = lock(&self.inner);
        loop {
            if g.closed {
                return None;
            }
            match g.queue.pop_front() {
                Some(Out::Reply(b)) => return Some((b, true)),
                Some(Out::Event { bytes, at }) => {
                    g.event_bytes -= bytes.len();
                    let payload = bytes[16..].to_vec();
                    g.pending_events.remove(&payload);
                    if at.elapsed() > self.event_timeout {
                        g.dropped_events += 1;
                        continue;
                    }
                    return Some((bytes, false));
                }
                None => g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }

    fn reply_written(&self) {
        let mut g = lock(&self.inner);
        g.replies = g.replies.saturating_sub(1);
        self.cv.notify_all();
    }

    pub fn close(&self) {
        let mut g = lock(&self.inner);
        g.closed = true;
        g.queue.clear();
        g.pending_events.clear();
        g.event_bytes = 0;
        self.cv.notify_all();
    }

    pub fn dropped_events(&self) -> u64 {
        lock(&self.inner).dropped_events
    }

    /// (replies not yet written, events queued, bytes of queued events).
    pub fn queued(&self) -> (usize, usize, usize) {
        let g = lock(&self.inner);
        let events = g.queue.len()
            - g.queue
                .iter()
                .filter(|o| matches!(o, Out::Reply(_)))
                .count();
        (g.replies, events, g.event_bytes)
    }
}

/// Starts serving `stream` as a connection of `domid`.
pub(crate) fn spawn(xs: &Arc<Xenstored>, stream: UnixStream, domid: u32) -> std::io::Result<()> {
    let q = xs.quotas();
    let out = Arc::new(Outbox::new(q.event_queue_bytes, q.watch_event_timeout));
    let wstream = stream.try_clone()?;
    let kill = stream.try_clone()?;
    let id = xs.register_conn(domid, out.clone(), kill);
    let limit = if domid == 0 {
        PRIVILEGED_OUTSTANDING
    } else {
        q.outstanding_requests.max(1)
    };

    let wout = out.clone();
    let spawned_writer = std::thread::Builder::new()
        .name(format!("xenstored-w{id}"))
        .spawn(move || writer(wstream, &wout));
    if let Err(e) = spawned_writer {
        xs.drop_conn(id);
        return Err(e);
    }
    let rxs = xs.clone();
    let spawned_reader = std::thread::Builder::new()
        .name(format!("xenstored-r{id}"))
        .spawn(move || reader(&rxs, id, stream, &out, limit));
    if let Err(e) = spawned_reader {
        xs.drop_conn(id);
        return Err(e);
    }
    Ok(())
}

fn writer(mut s: UnixStream, out: &Outbox) {
    while let Some((bytes, is_reply)) = out.pop() {
        let res = s.write_all(&bytes);
        if is_reply {
            out.reply_written();
        }
        if res.is_err() {
            out.close();
            let _ = s.shutdown(Shutdown::Both);
            return;
        }
    }
}

fn reader(xs: &Arc<Xenstored>, id: u64, mut s: UnixStream, out: &Outbox, limit: usize) {
    let domid = xs.conn_domid(id);
    let _span = tracing::debug_span!("xenstored_conn", conn = id, domid).entered();
    tracing::debug!("connection opened");
    loop {
        // cxenstored stops reading a domain that has too many unanswered requests.
        if !out.wait_below(limit) {
            break;
        }
        match Message::read_from(&mut s) {
            Ok(m) => {
                if !xs.process(id, &m) {
                    break;
                }
            }
            Err(WireError::TooLong { type_, len }) => {
                tracing::warn!(
                    conn = id,
                    type_,
                    len,
                    "xenstore client sent an oversized header; dropping it"
                );
                break;
            }
            Err(_) => break,
        }
    }
    xs.drop_conn(id);
    let _ = s.shutdown(Shutdown::Both);
    tracing::debug!(dropped_events = out.dropped_events(), "connection closed");
}

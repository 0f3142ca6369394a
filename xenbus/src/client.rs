//! The xenstore client: one connection, many concurrent callers.
//!
//! A reader thread owns the receiving side of the connection. It demultiplexes replies to the
//! waiting callers by `req_id` and routes `XS_WATCH_EVENT` messages to [`EventQueue`]s. Each
//! request is encoded into one buffer and written with one `write` under the writer lock, so
//! concurrent requests never interleave on the wire.
//!
//! When the connection fails (peer closed it, I/O error, a header announcing more than 4096
//! bytes (XSA-72), a malformed stream), the client is *dead*: every waiting caller gets
//! [`XsError::Dead`], every watch queue is closed, and every later call fails at once. Nothing
//! the server sends can make the client panic or a caller hang (with
//! [`ClientOptions::request_timeout`], not even a server that never answers).

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{debug, warn};
use xen::abi::xs_wire::{errno_of, XENSTORE_ABS_PATH_MAX, XENSTORE_PAYLOAD_MAX};
use xen::XsStream;

use crate::watch::{EventQueue, RecvTimeoutError as QueueRecvError, WatchEvent};
use crate::watch::{QueueStats, DEFAULT_WATCH_QUEUE_CAPACITY};
use crate::wire::{msg, split_nul, type_name, Decoder, Message, Perm};

/// The operation a request performed, for error messages (`ENOENT reading <path>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// XS_READ.
    Read,
    /// XS_WRITE.
    Write,
    /// XS_MKDIR.
    Mkdir,
    /// XS_RM.
    Rm,
    /// XS_DIRECTORY / XS_DIRECTORY_PART.
    Directory,
    /// XS_GET_PERMS.
    GetPerms,
    /// XS_SET_PERMS.
    SetPerms,
    /// XS_GET_DOMAIN_PATH.
    GetDomainPath,
    /// XS_WATCH.
    Watch,
    /// XS_UNWATCH.
    Unwatch,
    /// XS_RESET_WATCHES.
    ResetWatches,
    /// XS_TRANSACTION_START.
    TransactionStart,
    /// XS_TRANSACTION_END.
    TransactionEnd,
    /// XS_CONTROL.
    Control,
    /// XS_INTRODUCE.
    Introduce,
    /// XS_RELEASE.
    Release,
    /// XS_IS_DOMAIN_INTRODUCED.
    IsDomainIntroduced,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Read => "reading",
            Op::Write => "writing",
            Op::Mkdir => "creating",
            Op::Rm => "removing",
            Op::Directory => "listing",
            Op::GetPerms => "getting permissions of",
            Op::SetPerms => "setting permissions of",
            Op::GetDomainPath => "getting the domain path of domain",
            Op::Watch => "watching",
            Op::Unwatch => "unwatching",
            Op::ResetWatches => "resetting watches",
            Op::TransactionStart => "starting a transaction",
            Op::TransactionEnd => "ending transaction",
            Op::Control => "control command",
            Op::Introduce => "introducing domain",
            Op::Release => "releasing domain",
            Op::IsDomainIntroduced => "checking introduction of domain",
        })
    }
}

/// Errors of xenstore operations. Each names the operation and the path (or domain) it was
/// about.
#[derive(Debug, thiserror::Error)]
pub enum XsError {
    /// xenstored answered with XS_ERROR.
    #[error("{name} {op} {path}")]
    Server {
        /// The operation.
        op: Op,
        /// The path (or domain id, transaction id) it was about.
        path: String,
        /// The errno (EINVAL for names xenstored does not define).
        errno: i32,
        /// The error name as sent by xenstored (escaped).
        name: String,
    },
    /// The connection is dead; nothing more can be done with this client.
    #[error("{op} {path}: xenstore connection {describe} is dead: {reason}")]
    Dead {
        /// The operation.
        op: Op,
        /// The path.
        path: String,
        /// The connection.
        describe: String,
        /// Why it died.
        reason: String,
    },
    /// No reply within [`ClientOptions::request_timeout`].
    #[error("{op} {path}: no reply from xenstore within {after:?}")]
    Timeout {
        /// The operation.
        op: Op,
        /// The path.
        path: String,
        /// The timeout.
        after: Duration,
    },
    /// The request cannot be sent (bad path, payload too large).
    #[error("{op} {path}: invalid request: {why}")]
    BadRequest {
        /// The operation.
        op: Op,
        /// The path (escaped).
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The reply does not have the form its request requires.
    #[error("{op} {path}: malformed reply from xenstore: {why}")]
    BadReply {
        /// The operation.
        op: Op,
        /// The path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A transaction kept conflicting (EAGAIN) and the retry budget ran out.
    #[error("transaction still conflicting (EAGAIN) after {attempts} attempts")]
    TransactionRetriesExhausted {
        /// Attempts made.
        attempts: u32,
    },
    /// The client could not be set up.
    #[error("setting up the xenstore client for {describe}: {source}")]
    Setup {
        /// The connection.
        describe: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl XsError {
    /// The errno of a server error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            XsError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Whether xenstored said the node does not exist.
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(libc::ENOENT)
    }

    /// Whether xenstored said to try again (transaction conflict or rate limit).
    pub fn is_again(&self) -> bool {
        self.errno() == Some(libc::EAGAIN)
    }

    /// Whether the connection is dead.
    pub fn is_dead(&self) -> bool {
        matches!(self, XsError::Dead { .. })
    }
}

/// Settings of a client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long a caller waits for its reply; `None` waits until the reply or the connection's
    /// death (like libxenstore).
    pub request_timeout: Option<Duration>,
    /// Attempts of [`XsClient::transaction`] before giving up on EAGAIN.
    pub tx_max_attempts: u32,
    /// First backoff delay after EAGAIN; doubles each attempt.
    pub tx_backoff_base: Duration,
    /// Largest backoff delay.
    pub tx_backoff_cap: Duration,
    /// Capacity of the queue made by [`XsClient::watch`].
    pub watch_queue_capacity: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_timeout: None,
            tx_max_attempts: 20,
            tx_backoff_base: Duration::from_millis(1),
            tx_backoff_cap: Duration::from_millis(250),
            watch_queue_capacity: DEFAULT_WATCH_QUEUE_CAPACITY,
        }
    }
}

/// Counters of a client, for metrics (atomics: reading them takes no lock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Requests sent.
    pub requests: u64,
    /// XS_ERROR replies received.
    pub error_replies: u64,
    /// Watch events received (before coalescing).
    pub watch_events: u64,
    /// Transactions retried after EAGAIN.
    pub tx_retries: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    error_replies: AtomicU64,
    watch_events: AtomicU64,
    tx_retries: AtomicU64,
}

type Reply = Result<Message, String>;

struct WatchReg {
    token: Arc<str>,
    path: Arc<str>,
    queue: EventQueue,
}

#[derive(Default)]
struct Shared {
    pending: HashMap<u32, Sender<Reply>>,
    watches: HashMap<String, WatchReg>,
    dead: Option<String>,
}

struct Conn {
    describe: String,
    shared: Mutex<Shared>,
    counters: Counters,
}

/// The reason recorded when the client itself closes the connection.
const CLIENT_CLOSED: &str = "client closed";

impl Conn {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // Every critical section is a handful of map operations that cannot panic half-way,
        // so a poisoned lock still guards consistent data.
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Declares the connection dead: fails every waiter, closes every watch queue.
    fn kill(&self, reason: &str) {
        let mut sh = self.lock();
        if sh.dead.is_some() {
            return;
        }
        if reason == CLIENT_CLOSED {
            // Our own side closed the connection: nothing went wrong.
            tracing::debug!(conn = %self.describe, "xenstore connection closed");
        } else {
            warn!(conn = %self.describe, reason, "xenstore connection dead");
        }
        sh.dead = Some(reason.to_owned());
        for (_, waiter) in sh.pending.drain() {
            // The waiter may have timed out and gone; nothing to do then.
            let _ = waiter.send(Err(reason.to_owned()));
        }
        for (_, reg) in sh.watches.drain() {
            reg.queue
                .close(&format!("xenstore connection dead: {reason}"));
        }
    }

    fn dispatch(&self, m: Message) {
        if m.type_ == msg::XS_WATCH_EVENT {
            self.counters.watch_events.fetch_add(1, Ordering::Relaxed);
            let parts = split_nul(&m.payload);
            let (Some(path), Some(token)) = (parts.first(), parts.get(1)) else {
                warn!(conn = %self.describe, "watch event without path and token; dropped");
                return;
            };
            let (Ok(path), Ok(token)) = (std::str::from_utf8(path), std::str::from_utf8(token))
            else {
                warn!(conn = %self.describe, "watch event not UTF-8; dropped");
                return;
            };
            let sh = self.lock();
            match sh.watches.get(token) {
                Some(reg) => {
                    reg.queue.push(&reg.token, &reg.path, path);
                }
                None => debug!(conn = %self.describe, token, "event for a removed watch"),
            }
            return;
        }
        let waiter = self.lock().pending.remove(&m.req_id);
        match waiter {
            // A failed send means the caller timed out; the reply is dropped.
            Some(w) => {
                let _ = w.send(Ok(m));
            }
            None => debug!(
                conn = %self.describe,
                req_id = m.req_id,
                type_ = type_name(m.type_),
                "reply nobody waits for (timed out?); dropped"
            ),
        }
    }
}

struct Inner {
    conn: Arc<Conn>,
    writer: Mutex<File>,
    next_req: AtomicU32,
    next_watch: AtomicU64,
    opts: ClientOptions,
    /// Dropping this wakes the reader thread, which then exits.
    wake: Mutex<Option<OwnedFd>>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let wake = self
            .wake
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        drop(wake);
        let reader = self
            .reader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(h) = reader {
            // The reader never holds an `Inner`, so this is not the reader thread.
            let _ = h.join();
        }
    }
}

/// A xenstore connection shared by any number of threads. Cloning is cheap and gives another
/// handle to the same connection; the connection closes when the last handle (including
/// watch handles) is dropped.
#[derive(Clone)]
pub struct XsClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for XsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XsClient")
            .field("conn", &self.inner.conn.describe)
            .field("dead", &self.inner.conn.lock().dead)
            .finish()
    }
}

fn reader_loop(conn: Arc<Conn>, mut file: File, wake: OwnedFd) {
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; XENSTORE_PAYLOAD_MAX + 16];
    loop {
        let (data_ready, woken) = {
            let mut fds = [
                PollFd::new(file.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => (),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    conn.kill(&format!("poll failed: {e}"));
                    return;
                }
            }
            (
                fds[0].revents().is_some_and(|r| !r.is_empty()),
                fds[1].revents().is_some_and(|r| !r.is_empty()),
            )
        };
        if woken {
            conn.kill(CLIENT_CLOSED);
            return;
        }
        if !data_ready {
            continue;
        }
        let n = match file.read(&mut buf) {
            Ok(0) => {
                let reason = if dec.buffered() > 0 {
                    "closed by xenstored in the middle of a message"
                } else {
                    "closed by xenstored"
                };
                conn.kill(reason);
                return;
            }
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock =>
            {
                continue
            }
            Err(e) => {
                conn.kill(&format!("read failed: {e}"));
                return;
            }
        };
        dec.push(&buf[..n]);
        loop {
            match dec.next_message() {
                Ok(Some(m)) => conn.dispatch(m),
                Ok(None) => break,
                Err(e) => {
                    // XSA-72: an oversized header is refused before allocating; the stream
                    // can no longer be trusted.
                    conn.kill(&e.to_string());
                    return;
                }
            }
        }
    }
}

fn check_path(op: Op, path: &str) -> Result<(), XsError> {
    let why = if path.is_empty() {
        "empty path"
    } else if path.contains('\0') {
        "path contains NUL"
    } else if path.len() > XENSTORE_ABS_PATH_MAX {
        "path longer than 3072 bytes"
    } else {
        return Ok(());
    };
    Err(XsError::BadRequest {
        op,
        path: crate::state::escape_for_log(path.as_bytes(), 128),
        why: why.to_owned(),
    })
}

fn parse_u32_reply(op: Op, path: &str, m: &Message) -> Result<u32, XsError> {
    let s = m.string().map_err(|e| XsError::BadReply {
        op,
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    crate::parse::strict_u32(s.as_bytes()).ok_or_else(|| XsError::BadReply {
        op,
        path: path.to_owned(),
        why: format!(
            "expected a decimal number, got {:?}",
            crate::state::escape_for_log(s.as_bytes(), 32)
        ),
    })
}

fn expect_ok(op: Op, path: &str, m: &Message) -> Result<(), XsError> {
    if m.payload.strip_suffix(&[0]).unwrap_or(&m.payload) == b"OK" {
        Ok(())
    } else {
        Err(XsError::BadReply {
            op,
            path: path.to_owned(),
            why: format!(
                "expected OK, got {:?}",
                crate::state::escape_for_log(&m.payload, 32)
            ),
        })
    }
}

impl XsClient {
    /// A client over a connection from [`xen::XenHost::open_xenstore`].
    pub fn new(stream: XsStream) -> Result<XsClient, XsError> {
        Self::with_options(stream, ClientOptions::default())
    }

    /// A client over a unix socket connection (for tests and the sim).
    pub fn from_unix(stream: UnixStream, describe: &str) -> Result<XsClient, XsError> {
        Self::new(XsStream {
            file: File::from(OwnedFd::from(stream)),
            describe: describe.to_owned(),
        })
    }

    /// A client with explicit settings.
    pub fn with_options(stream: XsStream, opts: ClientOptions) -> Result<XsClient, XsError> {
        let describe = stream.describe;
        let setup = |source| XsError::Setup {
            describe: describe.clone(),
            source,
        };
        let read_file = stream.file.try_clone().map_err(setup)?;
        let (wake_rx, wake_tx) = nix::unistd::pipe().map_err(|e| setup(e.into()))?;
        let conn = Arc::new(Conn {
            describe: describe.clone(),
            shared: Mutex::new(Shared::default()),
            counters: Counters::default(),
        });
        let reader_conn = Arc::clone(&conn);
        let reader = std::thread::Builder::new()
            .name("xenstore-reader".to_owned())
            .spawn(move || reader_loop(reader_conn, read_file, wake_rx))
            .map_err(setup)?;
        Ok(XsClient {
            inner: Arc::new(Inner {
                conn,
                writer: Mutex::new(stream.file),
                next_req: AtomicU32::new(1),
                next_watch: AtomicU64::new(1),
                opts,
                wake: Mutex::new(Some(wake_tx)),
                reader: Mutex::new(Some(reader)),
            }),
        })
    }

    /// Where the connection goes.
    pub fn describe(&self) -> &str {
        &self.inner.conn.describe
    }

    /// Why the connection died, if it did.
    pub fn dead_reason(&self) -> Option<String> {
        self.inner.conn.lock().dead.clone()
    }

    /// The counters.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.conn.counters;
        ClientStats {
            requests: c.requests.load(Ordering::Relaxed),
            error_replies: c.error_replies.load(Ordering::Relaxed),
            watch_events: c.watch_events.load(Ordering::Relaxed),
            tx_retries: c.tx_retries.load(Ordering::Relaxed),
        }
    }

    /// The settings.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    fn dead_err(&self, op: Op, path: &str, reason: String) -> XsError {
        XsError::Dead {
            op,
            path: path.to_owned(),
            describe: self.inner.conn.describe.clone(),
            reason,
        }
    }

    /// Sends one request and waits for its reply. XS_ERROR replies become
    /// [`XsError::Server`].
    pub fn raw_request(
        &self,
        type_: u32,
        tx_id: u32,
        payload: Vec<u8>,
        op: Op,
        path: &str,
    ) -> Result<Message, XsError> {
        let conn = &self.inner.conn;
        let (tx, rx) = bounded::<Reply>(1);
        let mut m = Message {
            type_,
            req_id: 0,
            tx_id,
            payload,
        };
        {
            let mut sh = conn.lock();
            if let Some(reason) = &sh.dead {
                return Err(self.dead_err(op, path, reason.clone()));
            }
            let mut id = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
            while sh.pending.contains_key(&id) {
                id = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
            }
            m.req_id = id;
            sh.pending.insert(id, tx);
        }
        let req_id = m.req_id;
        conn.counters.requests.fetch_add(1, Ordering::Relaxed);
        let bytes = match m.encode() {
            Ok(b) => b,
            Err(e) => {
                conn.lock().pending.remove(&req_id);
                return Err(XsError::BadRequest {
                    op,
                    path: path.to_owned(),
                    why: e.to_string(),
                });
            }
        };
        {
            let mut w = self
                .inner
                .writer
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Err(e) = w.write_all(&bytes) {
                drop(w);
                // A partial write desynchronises the stream: the connection is unusable.
                let reason = format!("write failed: {e}");
                conn.kill(&reason);
                return Err(self.dead_err(op, path, reason));
            }
        }
        let reply = match self.inner.opts.request_timeout {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d),
        };
        let reply = match reply {
            Ok(Ok(m)) => m,
            Ok(Err(reason)) => return Err(self.dead_err(op, path, reason)),
            Err(RecvTimeoutError::Disconnected) => {
                let reason = self
                    .dead_reason()
                    .unwrap_or_else(|| "reply channel closed".to_owned());
                return Err(self.dead_err(op, path, reason));
            }
            Err(RecvTimeoutError::Timeout) => {
                conn.lock().pending.remove(&req_id);
                return Err(XsError::Timeout {
                    op,
                    path: path.to_owned(),
                    after: self.inner.opts.request_timeout.unwrap_or_default(),
                });
            }
        };
        if reply.type_ == msg::XS_ERROR {
            conn.counters.error_replies.fetch_add(1, Ordering::Relaxed);
            let raw = reply.payload.strip_suffix(&[0]).unwrap_or(&reply.payload);
            let name = crate::state::escape_for_log(raw, 32);
            return Err(XsError::Server {
                op,
                path: path.to_owned(),
                errno: errno_of(&name),
                name,
            });
        }
        if reply.type_ != type_ {
            return Err(XsError::BadReply {
                op,
                path: path.to_owned(),
                why: format!(
                    "reply type {} to a {} request",
                    type_name(reply.type_),
                    type_name(type_)
                ),
            });
        }
        Ok(reply)
    }

    /// The path of a domain's home (`/local/domain/<domid>`).
    pub fn get_domain_path(&self, domid: u32) -> Result<String, XsError> {
        let d = domid.to_string();
        let m = self.raw_request(
            msg::XS_GET_DOMAIN_PATH,
            0,
            nul_terminated(&d),
            Op::GetDomainPath,
            &d,
        )?;
        m.string()
            .map(str::to_owned)
            .map_err(|e| XsError::BadReply {
                op: Op::GetDomainPath,
                path: d,
                why: e.to_string(),
            })
    }

    /// Sets a watch on `path` (and everything under it) whose events go to a new queue of the
    /// default capacity. The watch is removed when the returned handle is dropped.
    pub fn watch(&self, path: &str, token: &str) -> Result<Watch, XsError> {
        self.watch_with_capacity(path, token, self.inner.opts.watch_queue_capacity)
    }

    /// [`XsClient::watch`] with a queue of `capacity` pending events.
    pub fn watch_with_capacity(
        &self,
        path: &str,
        token: &str,
        capacity: usize,
    ) -> Result<Watch, XsError> {
        let queue = EventQueue::new(capacity);
        let guard = self.watch_into(path, token, &queue)?;
        Ok(Watch { guard, queue })
    }

    /// Sets a watch whose events go to an existing queue (so one thread can wait on several
    /// watches). Events carry `token`, which need not be unique: the client gives each watch
    /// its own token on the wire.
    pub fn watch_into(
        &self,
        path: &str,
        token: &str,
        queue: &EventQueue,
    ) -> Result<WatchGuard, XsError> {
        check_path(Op::Watch, path)?;
        if token.contains('\0') {
            return Err(XsError::BadRequest {
                op: Op::Watch,
                path: path.to_owned(),
                why: "token contains NUL".to_owned(),
            });
        }
        let n = self.inner.next_watch.fetch_add(1, Ordering::Relaxed);
        let wire_token = format!("{n:x}:{token}");
        {
            // Registered before the request: xenstored fires the first event right after
            // its reply, and the reader may see it before we do.
            let mut sh = self.inner.conn.lock();
            if let Some(reason) = &sh.dead {
                return Err(self.dead_err(Op::Watch, path, reason.clone()));
            }
            sh.watches.insert(
                wire_token.clone(),
                WatchReg {
                    token: Arc::from(token),
                    path: Arc::from(path),
                    queue: queue.clone(),
                },
            );
        }
        let payload = strings_payload(&[path.as_bytes(), wire_token.as_bytes()]);
        match self.raw_request(msg::XS_WATCH, 0, payload, Op::Watch, path) {
            Ok(_) => Ok(WatchGuard {
                client: self.clone(),
                wire_token,
                path: path.to_owned(),
                active: true,
            }),
            Err(e) => {
                self.inner.conn.lock().watches.remove(&wire_token);
                Err(e)
            }
        }
    }

    fn unwatch_wire(&self, path: &str, wire_token: &str) -> Result<(), XsError> {
        let was = self.inner.conn.lock().watches.remove(wire_token).is_some();
        if !was {
            // Reset or connection death removed it already.
            return Ok(());
        }
        let payload = strings_payload(&[path.as_bytes(), wire_token.as_bytes()]);
        self.raw_request(msg::XS_UNWATCH, 0, payload, Op::Unwatch, path)
            .map(|_| ())
    }

    /// Removes every watch of this connection (XS_RESET_WATCHES); their queues are closed.
    pub fn reset_watches(&self) -> Result<(), XsError> {
        self.raw_request(msg::XS_RESET_WATCHES, 0, vec![0], Op::ResetWatches, "")?;
        let regs: Vec<WatchReg> = self
            .inner
            .conn
            .lock()
            .watches
            .drain()
            .map(|(_, r)| r)
            .collect();
        for r in regs {
            r.queue.close("watches reset");
        }
        Ok(())
    }

    /// XS_CONTROL with NUL-separated arguments; returns the reply payload.
    pub fn control(&self, args: &[&[u8]]) -> Result<Vec<u8>, XsError> {
        let what = args
            .first()
            .map(|a| crate::state::escape_for_log(a, 32))
            .unwrap_or_default();
        let m = self.raw_request(
            msg::XS_CONTROL,
            0,
            strings_payload(args),
            Op::Control,
            &what,
        )?;
        Ok(m.payload)
    }

    /// Introduces a domain to xenstored (XS_INTRODUCE: domid, store page frame, event
    /// channel port).
    pub fn introduce(&self, domid: u32, mfn: u64, port: u32) -> Result<(), XsError> {
        let (d, f, p) = (domid.to_string(), mfn.to_string(), port.to_string());
        let m = self.raw_request(
            msg::XS_INTRODUCE,
            0,
            strings_payload(&[d.as_bytes(), f.as_bytes(), p.as_bytes()]),
            Op::Introduce,
            &d,
        )?;
        expect_ok(Op::Introduce, &d, &m)
    }

    /// Tells xenstored a domain is gone (XS_RELEASE).
    pub fn release(&self, domid: u32) -> Result<(), XsError> {
        let d = domid.to_string();
        let m = self.raw_request(msg::XS_RELEASE, 0, nul_terminated(&d), Op::Release, &d)?;
        expect_ok(Op::Release, &d, &m)
    }

    /// Whether xenstored knows the domain (XS_IS_DOMAIN_INTRODUCED).
    pub fn is_domain_introduced(&self, domid: u32) -> Result<bool, XsError> {
        let d = domid.to_string();
        let m = self.raw_request(
            msg::XS_IS_DOMAIN_INTRODUCED,
            0,
            nul_terminated(&d),
            Op::IsDomainIntroduced,
            &d,
        )?;
        match m.payload.strip_suffix(&[0]).unwrap_or(&m.payload) {
            b"T" => Ok(true),
            b"F" => Ok(false),
            other => Err(XsError::BadReply {
                op: Op::IsDomainIntroduced,
                path: d,
                why: format!(
                    "expected T or F, got {:?}",
                    crate::state::escape_for_log(other, 32)
                ),
            }),
        }
    }

    /// Starts a transaction; prefer [`XsClient::transaction`], which retries conflicts.
    pub fn transaction_start(&self) -> Result<Transaction<'_>, XsError> {
        let m = self.raw_request(
            msg::XS_TRANSACTION_START,
            0,
            vec![0],
            Op::TransactionStart,
            "",
        )?;
        let id = parse_u32_reply(Op::TransactionStart, "", &m)?;
        if id == 0 {
            return Err(XsError::BadReply {
                op: Op::TransactionStart,
                path: String::new(),
                why: "transaction id 0".to_owned(),
            });
        }
        Ok(Transaction {
            client: self,
            id,
            saw_again: Cell::new(false),
            ended: Cell::new(false),
        })
    }

    /// Runs `f` in a transaction and commits it. On EAGAIN (a conflict at commit, or any
    /// operation inside answering EAGAIN, as xenstored's rate limiting does: XSA-206) the
    /// transaction is aborted and `f` runs again after an exponential, jittered backoff, at
    /// most [`ClientOptions::tx_max_attempts`] times. Any other error from `f` aborts the
    /// transaction and is returned. `f` must therefore be safe to run several times.
    pub fn transaction<T, E, F>(&self, mut f: F) -> Result<T, E>
    where
        F: FnMut(&Transaction<'_>) -> Result<T, E>,
        E: From<XsError>,
    {
        let opts = &self.inner.opts;
        let attempts = opts.tx_max_attempts.max(1);
        let mut rng = seed();
        for attempt in 0..attempts {
            let retry = match self.transaction_start() {
                Err(e) if e.is_again() => true,
                Err(e) => return Err(e.into()),
                Ok(tx) => match f(&tx) {
                    Ok(v) => match tx.commit() {
                        Ok(()) => return Ok(v),
                        Err(e) if e.is_again() => true,
                        Err(e) => return Err(e.into()),
                    },
                    Err(e) => {
                        let again = tx.saw_again.get();
                        // A failed abort changes nothing: the closure's error is the news.
                        let _ = tx.abort();
                        if !again {
                            return Err(e);
                        }
                        true
                    }
                },
            };
            debug_assert!(retry);
            self.inner
                .conn
                .counters
                .tx_retries
                .fetch_add(1, Ordering::Relaxed);
            if attempt + 1 < attempts {
                let exp = opts
                    .tx_backoff_base
                    .saturating_mul(1u32 << attempt.min(20))
                    .min(opts.tx_backoff_cap);
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let jitter_ns = exp.as_nanos() as u64 / 2;
                let jitter = Duration::from_nanos(if jitter_ns == 0 { 0 } else { rng % jitter_ns });
                debug!(attempt, backoff = ?(exp + jitter), "xenstore transaction conflict; retrying");
                // Backoff, not synchronisation: xenstored asks us to slow down.
                std::thread::sleep(exp + jitter);
            }
        }
        Err(XsError::TransactionRetriesExhausted { attempts }.into())
    }
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    (t ^ (std::process::id() as u64).rotate_left(32)) | 1
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

fn strings_payload(parts: &[&[u8]]) -> Vec<u8> {
    Message::with_strings(0, 0, 0, parts).payload
}

/// The operations that can run inside a transaction (or outside one, on [`XsClient`]).
pub trait XsOps {
    /// The client.
    fn client(&self) -> &XsClient;
    /// The transaction id (0 for none).
    fn tx_id(&self) -> u32;
    /// Sends a request within this transaction.
    fn request(&self, type_: u32, payload: Vec<u8>, op: Op, path: &str)
        -> Result<Message, XsError>;

    /// Reads a node's value.
    fn read(&self, path: &str) -> Result<Vec<u8>, XsError> {
        check_path(Op::Read, path)?;
        Ok(self
            .request(msg::XS_READ, nul_terminated(path), Op::Read, path)?
            .payload)
    }

    /// Reads a node's value; `None` if the node does not exist.
    fn try_read(&self, path: &str) -> Result<Option<Vec<u8>>, XsError> {
        match self.read(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads a node's value as UTF-8.
    fn read_string(&self, path: &str) -> Result<String, XsError> {
        let v = self.read(path)?;
        String::from_utf8(v).map_err(|e| XsError::BadReply {
            op: Op::Read,
            path: path.to_owned(),
            why: format!(
                "value is not UTF-8: {:?}",
                crate::state::escape_for_log(e.as_bytes(), 32)
            ),
        })
    }

    /// Whether a node exists.
    fn exists(&self, path: &str) -> Result<bool, XsError> {
        Ok(self.try_read(path)?.is_some())
    }

    /// Writes a node, creating it and its parents.
    fn write(&self, path: &str, value: &[u8]) -> Result<(), XsError> {
        check_path(Op::Write, path)?;
        let mut p = Vec::with_capacity(path.len() + 1 + value.len());
        p.extend_from_slice(path.as_bytes());
        p.push(0);
        p.extend_from_slice(value);
        self.request(msg::XS_WRITE, p, Op::Write, path).map(|_| ())
    }

    /// Creates a node (and its parents) with an empty value; an existing node is kept.
    fn mkdir(&self, path: &str) -> Result<(), XsError> {
        check_path(Op::Mkdir, path)?;
        self.request(msg::XS_MKDIR, nul_terminated(path), Op::Mkdir, path)
            .map(|_| ())
    }

    /// Removes a node and everything under it.
    fn rm(&self, path: &str) -> Result<(), XsError> {
        check_path(Op::Rm, path)?;
        self.request(msg::XS_RM, nul_terminated(path), Op::Rm, path)
            .map(|_| ())
    }

    /// The names of a node's children. A listing too large for one reply (E2BIG) is fetched
    /// with XS_DIRECTORY_PART, as libxenstore does.
    fn directory(&self, path: &str) -> Result<Vec<String>, XsError> {
        check_path(Op::Directory, path)?;
        match self.request(msg::XS_DIRECTORY, nul_terminated(path), Op::Directory, path) {
            Ok(m) => names(path, &m.payload),
            Err(e) if e.errno() == Some(libc::E2BIG) => directory_part(self, path),
            Err(e) => Err(e),
        }
    }

    /// A node's permissions.
    fn get_perms(&self, path: &str) -> Result<Vec<Perm>, XsError> {
        check_path(Op::GetPerms, path)?;
        let m = self.request(msg::XS_GET_PERMS, nul_terminated(path), Op::GetPerms, path)?;
        Perm::parse_list(split_nul(&m.payload)).map_err(|e| XsError::BadReply {
            op: Op::GetPerms,
            path: path.to_owned(),
            why: e.to_string(),
        })
    }

    /// Sets a node's permissions: the first entry is the owner and everyone's access.
    fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        check_path(Op::SetPerms, path)?;
        if perms.is_empty() {
            return Err(XsError::BadRequest {
                op: Op::SetPerms,
                path: path.to_owned(),
                why: "empty permission list".to_owned(),
            });
        }
        let wires: Vec<String> = perms.iter().map(Perm::to_wire).collect();
        let mut parts: Vec<&[u8]> = vec![path.as_bytes()];
        parts.extend(wires.iter().map(|w| w.as_bytes()));
        self.request(
            msg::XS_SET_PERMS,
            strings_payload(&parts),
            Op::SetPerms,
            path,
        )
        .map(|_| ())
    }
}

fn names(path: &str, payload: &[u8]) -> Result<Vec<String>, XsError> {
    split_nul(payload)
        .into_iter()
        .map(|n| {
            String::from_utf8(n.to_vec()).map_err(|_| XsError::BadReply {
                op: Op::Directory,
                path: path.to_owned(),
                why: "child name is not UTF-8".to_owned(),
            })
        })
        .collect()
}

/// Largest listing fetched in parts, and most restarts after the node changed meanwhile.
const DIRECTORY_PART_MAX_BYTES: usize = 16 << 20;
const DIRECTORY_PART_MAX_RESTARTS: u32 = 64;

/// libxenstore's `xs_directory_part`: fetch the listing from byte offset 0 onwards; every
/// reply starts with the node's generation, then NUL-terminated names; the last part ends
/// with an empty name (a double NUL). If the generation changes between parts, start over.
fn directory_part<X: XsOps + ?Sized>(x: &X, path: &str) -> Result<Vec<String>, XsError> {
    let bad = |why: &str| XsError::BadReply {
        op: Op::Directory,
        path: path.to_owned(),
        why: why.to_owned(),
    };
    let mut restarts = 0;
    'restart: loop {
        let mut gen: Option<Vec<u8>> = None;
        let mut strings: Vec<u8> = Vec::new();
        loop {
            let off = strings.len().to_string();
            let payload = strings_payload(&[path.as_bytes(), off.as_bytes()]);
            let m = match x.request(msg::XS_DIRECTORY_PART, payload, Op::Directory, path) {
                Ok(m) => m,
                Err(e) if e.errno() == Some(libc::ENOSYS) => {
                    // The server cannot list in parts: report the original E2BIG.
                    return Err(XsError::Server {
                        op: Op::Directory,
                        path: path.to_owned(),
                        errno: libc::E2BIG,
                        name: "E2BIG".to_owned(),
                    });
                }
                Err(e) => return Err(e),
            };
            let nul = m
                .payload
                .iter()
                .position(|b| *b == 0)
                .ok_or_else(|| bad("DIRECTORY_PART reply without generation"))?;
            let (g, rest) = (&m.payload[..nul], &m.payload[nul + 1..]);
            match &gen {
                None => gen = Some(g.to_vec()),
                Some(old) if old.as_slice() != g => {
                    restarts += 1;
                    if restarts > DIRECTORY_PART_MAX_RESTARTS {
                        return Err(bad("node keeps changing while listed in parts"));
                    }
                    continue 'restart;
                }
                Some(_) => {}
            }
            if rest.is_empty() && !strings.is_empty() {
                return Err(bad("empty DIRECTORY_PART reply before the end"));
            }
            strings.extend_from_slice(rest);
            if strings.len() > DIRECTORY_PART_MAX_BYTES {
                return Err(bad("listing larger than 16 MiB"));
            }
            let off = strings.len();
            if off <= 1 || strings[off - 2] == 0 {
                // Drop the terminating empty name.
                if off > 1 {
                    strings.pop();
                }
                return names(path, &strings);
            }
        }
    }
}

impl XsOps for XsClient {
    fn client(&self) -> &XsClient {
        self
    }
    fn tx_id(&self) -> u32 {
        0
    }
    fn request(
        &self,
        type_: u32,
        payload: Vec<u8>,
        op: Op,
        path: &str,
    ) -> Result<Message, XsError> {
        XsClient::raw_request(self, type_, 0, payload, op, path)
    }
}

/// An open transaction. Dropping it without [`Transaction::commit`] aborts it.
pub struct Transaction<'c> {
    client: &'c XsClient,
    id: u32,
    saw_again: Cell<bool>,
    ended: Cell<bool>,
}

impl fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction").field("id", &self.id).finish()
    }
}

impl Transaction<'_> {
    /// The transaction id.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn end(&self, commit: bool) -> Result<(), XsError> {
        self.ended.set(true);
        let id = self.id.to_string();
        let m = XsClient::raw_request(
            self.client,
            msg::XS_TRANSACTION_END,
            self.id,
            if commit {
                b"T\0".to_vec()
            } else {
                b"F\0".to_vec()
            },
            Op::TransactionEnd,
            &id,
        )?;
        expect_ok(Op::TransactionEnd, &id, &m)
    }

    /// Commits; EAGAIN means another writer conflicted and nothing was applied.
    pub fn commit(self) -> Result<(), XsError> {
        self.end(true)
    }

    /// Aborts.
    pub fn abort(self) -> Result<(), XsError> {
        self.end(false)
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.ended.get() {
            // Best effort: a dead connection drops the transaction anyway.
            let _ = self.end(false);
        }
    }
}

impl XsOps for Transaction<'_> {
    fn client(&self) -> &XsClient {
        self.client
    }
    fn tx_id(&self) -> u32 {
        self.id
    }
    fn request(
        &self,
        type_: u32,
        payload: Vec<u8>,
        op: Op,
        path: &str,
    ) -> Result<Message, XsError> {
        let r = XsClient::raw_request(self.client, type_, self.id, payload, op, path);
        if let Err(e) = &r {
            if e.is_again() {
                self.saw_again.set(true);
            }
        }
        r
    }
}

/// Removes its watch when dropped.
pub struct WatchGuard {
    client: XsClient,
    wire_token: String,
    path: String,
    active: bool,
}

impl fmt::Debug for WatchGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchGuard")
            .field("path", &self.path)
            .field("token", &self.wire_token)
            .finish()
    }
}

impl WatchGuard {
    /// The watched path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Removes the watch now, reporting errors.
    pub fn unwatch(mut self) -> Result<(), XsError> {
        self.active = false;
        self.client.unwatch_wire(&self.path, &self.wire_token)
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        if self.active {
            if let Err(e) = self.client.unwatch_wire(&self.path, &self.wire_token) {
                debug!(path = %self.path, error = %e, "unwatch on drop failed");
            }
        }
    }
}

/// A watch with its own event queue: a stream of [`WatchEvent`]s. Dropping it unwatches.
#[derive(Debug)]
pub struct Watch {
    guard: WatchGuard,
    queue: EventQueue,
}

impl Watch {
    /// Waits for the next event; `None` once the connection died (or watches were reset).
    pub fn recv(&self) -> Option<WatchEvent> {
        self.queue.recv()
    }

    /// Waits at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<WatchEvent, QueueRecvError> {
        self.queue.recv_timeout(timeout)
    }

    /// The next event if one is pending.
    pub fn try_recv(&self) -> Option<WatchEvent> {
        self.queue.try_recv()
    }

    /// The queue's counters.
    pub fn stats(&self) -> QueueStats {
        self.queue.stats()
    }

    /// The queue.
    pub fn queue(&self) -> &EventQueue {
        &self.queue
    }

    /// The watched path.
    pub fn path(&self) -> &str {
        self.guard.path()
    }

    /// Removes the watch now, reporting errors.
    pub fn unwatch(self) -> Result<(), XsError> {
        self.guard.unwatch()
    }
}

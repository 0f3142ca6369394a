//! xensim's xenstored: a xenstore server that behaves like C xenstored (cxenstored) of
//! Xen 4.17, per docs/misc/xenstore.txt.
//!
//! # Using it
//! ```no_run
//! use xensim::xenstored::{Quotas, Xenstored};
//! let xs = Xenstored::new(Quotas::default());
//! // dom0 clients (xenstore-utils with XENSTORED_PATH, domio) connect here:
//! let _listener = xs.listen("/tmp/xs.sock").unwrap();
//! // A guest's connection:
//! xs.introduce_domain(5);
//! xs.create_domain_home(5).unwrap();
//! let guest = xs.connect_as(5).unwrap();
//! // The simulated toolstack writes directly:
//! xs.write(0, "/local/domain/0/backend/vbd/5/51712/state", b"1").unwrap();
//! # drop(guest);
//! ```
//!
//! # Connections
//! Every connection has a domain identity. Connections accepted by [`Xenstored::listen`]
//! are dom0 (privileged), like `/run/xenstored/socket`. [`Xenstored::connect_as`] gives
//! one end of a socketpair whose connection acts as a given domain, which is how xensim's
//! guests reach xenstore. Each connection has a reader thread and a writer thread; all
//! state is behind one mutex. A reply is queued before the watch events its request
//! caused, so a client sees the reply first and the events after it.
//!
//! # Semantics (as cxenstored 4.17)
//! - Paths: absolute, or relative to `/local/domain/<domid>`; characters
//!   `[A-Za-z0-9-/_@]`, no trailing or double `/`, at most 3072 bytes, and at most
//!   [`Quotas::path_max`] (2048) bytes after a `/local/domain/<id>/` prefix (or in total
//!   without one). Violations give `EINVAL`.
//! - Permissions: the first entry names the owner and everyone's default access, later
//!   entries are per-domain exceptions. dom0 and the owner (or a domain whose SET_TARGET
//!   target is the owner) have full access. New nodes inherit their parent's list; a node
//!   created by a domU is owned by it. Only the owner or dom0 may SET_PERMS, and a domU
//!   may not change the owner (`EPERM`). A missing node reports `ENOENT` only if its
//!   nearest existing ancestor grants the access, `EACCES` otherwise.
//! - Watches fire once when registered, then for every change at or below their path
//!   (removing a subtree fires each removed child's exact watches, and the top node's
//!   watches at or above it). A connection only receives events for nodes it can read,
//!   or whose parent it can read, or (for SET_PERMS) that it could read before (XSA-115). `@introduceDomain` and `@releaseDomain` fire
//!   only for connections that can read those special nodes (dom0 by default; SET_PERMS
//!   on them can grant others). Relative watches report relative paths.
//! - Transactions follow cxenstored's model: each node a transaction touches (read or
//!   written, present or absent) is copied at its first access along with its
//!   generation; commit fails with `EAGAIN` if any of them changed in the committed tree
//!   since that access. Watch events of a transaction fire at commit.
//! - Quotas: see [`Quotas`]; dom0 is exempt from all of them except the path length.
//!
//! # Bounded memory (XSA-326, XSA-349 class)
//! - Outstanding requests: a domU connection whose unread replies reach
//!   [`Quotas::outstanding_requests`] is not read any further until it reads them (so its
//!   socket buffer fills and the client blocks), as cxenstored stops reading such a ring.
//!   dom0 connections are stopped at 1024 unread replies.
//! - Watch events are **dropped, not the connection**: an event identical to one still
//!   queued is dropped (as cxenstored 4.17), an event that would take the queued events of
//!   a connection past [`Quotas::event_queue_bytes`] is dropped, and a queued event older
//!   than [`Quotas::watch_event_timeout`] is dropped instead of sent.
//! - An event whose payload would exceed 4096 bytes is dropped (XSA-324); a reply that
//!   would exceed it becomes `E2BIG` (XSA-72); a header announcing more than 4096 bytes
//!   drops the connection before anything is allocated (XSA-72).
//!
//! # Known differences from cxenstored 4.17
//! - There is no shared ring page: `XS_INTRODUCE` only marks the domain introduced (its
//!   mfn and port are checked for syntax and ignored); guests connect with
//!   [`Xenstored::connect_as`]. Introducing an introduced domain is a no-op.
//! - A dead domain is forgotten eagerly at [`Xenstored::release_domain`]: nodes it owned
//!   become dom0's and its exceptions are removed from every list (cxenstored does the
//!   same lazily, via domain generation counts). Either way a recreated domid does not
//!   inherit anything (XSA-322).
//! - The memory quota (2 MiB soft / 2.5 MiB hard, nodes + watches + queued output) is not
//!   implemented as such; only the queued-event budget exists, and it applies to dom0 too.
//! - Several connections of one domid (possible with `connect_as`, impossible in Xen)
//!   share that domain's watch quota; the transaction quota is per connection.
//! - `XS_RESET_WATCHES` inside a transaction returns `EINVAL` (the XSA-484 fix direction;
//!   4.17 hit an assert). It removes the connection's watches and transactions.
//! - `XS_CONTROL` supports `print` and `log` (both answer `OK`); everything else `EINVAL`.
//! - `XS_GET_DOMAIN_PATH` and the domain requests parse the domid strictly (`EINVAL` for
//!   non-numbers) where cxenstored uses `atoi`.
//! - At commit, a transaction that takes a domain's node count to the quota or beyond
//!   (`count >= quota`, as cxenstored 4.17) fails with `ENOSPC`; outside transactions the
//!   count may reach the quota exactly, as there too. 4.17.0 applied this check even to
//!   dom0's transactions; we follow the later fix and check unprivileged callers only.
//!   While a transaction runs, node creation already counts the transaction's own
//!   pending creations (cxenstored counts committed nodes only and catches the rest at
//!   commit).
//! - Permission entries naming domains that do not exist are kept as given (cxenstored
//!   4.17 marks them ignored and leaves them out of GET_PERMS).
//! - Only dom0 is privileged (no `--master-domid`/`--priv-domid`). `XS_RESUME` answers
//!   `OK` for an introduced domain and has no other effect (there is no shutdown state).
//! - `@introduceDomain`/`@releaseDomain` fire watches registered on exactly that name.
//! - Nodes created in one request are created all or nothing; inside a transaction, a
//!   create that cxenstored would have left half done (node quota hit part-way) marks the
//!   transaction failed, so its commit answers `ENOMEM` as cxenstored's does.
//! - No write-rate limiting (XSA-206's wrl), no live update, no tdb.

#![deny(unsafe_code)]

mod conn;
mod error;
mod ops;
mod path;
mod state;
mod store;

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use xenbus::wire::{Message, Perm, PermKind};

pub use error::XsError;
pub use path::domain_path;
pub use state::{INTRODUCE_DOMAIN, RELEASE_DOMAIN};
pub use xen::DomId;

use conn::lock;
use state::State;

/// Limits, with cxenstored 4.17's defaults (`Quotas::default()`). dom0 is exempt from
/// all but `path_max`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quotas {
    /// Nodes a domain may own (`-e`, 1000). Over it: `ENOSPC`.
    pub nodes_per_domain: usize,
    /// Size of a node's record: 24 + 8 × permissions + value + child names (`-S`, 2048).
    /// A record of this size or more: `ENOSPC`.
    pub entry_size: usize,
    /// Watches per domain (`-W`, 128). As cxenstored, the check is `count > quota` before
    /// adding, so quota + 1 watches fit. Over it: `E2BIG`.
    pub watches_per_domain: usize,
    /// Open transactions per connection (`-t`, 10); checked like watches (quota + 1 fit).
    /// Over it: `ENOSPC`.
    pub transactions_per_conn: usize,
    /// Entries in a permission list, owner entry included (`-A`, 5). Over it: `ENOSPC`.
    pub perms_per_node: usize,
    /// Nodes one transaction may touch (`-T`, 1024). Over it: `ENOSPC`.
    pub nodes_per_transaction: usize,
    /// Path length after `/local/domain/<id>/` (`-M`, 2048, `XENSTORE_REL_PATH_MAX`).
    pub path_max: usize,
    /// Unread replies after which a domU connection is no longer read (`-Q`, 20).
    pub outstanding_requests: usize,
    /// Bytes of queued watch events per connection before new events are dropped
    /// (cxenstored's hard memory quota, 2.5 MiB).
    pub event_queue_bytes: usize,
    /// Age after which a queued watch event is dropped instead of sent (20 s).
    pub watch_event_timeout: Duration,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            nodes_per_domain: 1000,
            entry_size: 2048,
            watches_per_domain: 128,
            transactions_per_conn: 10,
            perms_per_node: 5,
            nodes_per_transaction: 1024,
            path_max: 2048,
            outstanding_requests: 20,
            event_queue_bytes: 2 * 1024 * 1024 + 512 * 1024,
            watch_event_timeout: Duration::from_secs(20),
        }
    }
}

/// What the server holds for a domain's connections and has not sent yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueuedOutput {
    /// Replies queued or being written (bounded by the outstanding-request quota).
    pub replies: usize,
    /// Watch events queued.
    pub events: usize,
    /// Bytes of queued watch events (bounded by [`Quotas::event_queue_bytes`]).
    pub event_bytes: usize,
}

/// The xenstore server. Cheap to share: `Arc<Xenstored>`.
pub struct Xenstored {
    state: Mutex<State>,
    quotas: Quotas,
}

impl std::fmt::Debug for Xenstored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xenstored")
            .field("quotas", &self.quotas)
            .finish_non_exhaustive()
    }
}

/// A listening socket served by a background thread; stops accepting (and removes the
/// socket file) when dropped. Connections already accepted keep running.
#[derive(Debug)]
pub struct Listener {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Xenstored {
    /// A server with an empty store (`/`, `/tool`, `/tool/xenstored`, owned by dom0) and
    /// the given limits.
    pub fn new(quotas: Quotas) -> Arc<Self> {
        Arc::new(Xenstored {
            state: Mutex::new(State::new(quotas.clone())),
            quotas,
        })
    }

    /// The limits in force.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// Serves a unix socket at `path` whose connections are dom0 (privileged), like
    /// `/run/xenstored/socket`. A stale socket file at `path` is replaced; any other
    /// existing file is an error.
    pub fn listen(self: &Arc<Self>, path: impl AsRef<Path>) -> io::Result<Listener> {
        let path = path.as_ref().to_path_buf();
        if let Ok(md) = std::fs::symlink_metadata(&path) {
            if md.file_type().is_socket() {
                std::fs::remove_file(&path)?;
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
        }
        let listener = UnixListener::bind(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let xs = self.clone();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("xenstored-accept".into())
            .spawn(move || {
                // Every accepted connection is served, so clients queued before the
                // listener is dropped are not lost (the wake-up connection is served
                // too and ends at once).
                for s in listener.incoming() {
                    match s {
                        Ok(s) => {
                            if let Err(e) = conn::spawn(&xs, s, 0) {
                                tracing::warn!(error = %e, "xenstored: cannot serve a connection");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "xenstored: accept failed"),
                    }
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                }
            })?;
        Ok(Listener {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// A connection acting as `domid`: the returned stream speaks the xenstore wire
    /// protocol. `domid` must be 0 or an introduced domain (else `NotFound`). The
    /// connection is closed by the server when the domain is released.
    pub fn connect_as(self: &Arc<Self>, domid: DomId) -> io::Result<UnixStream> {
        if !self.is_domain_introduced(domid) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("domain {domid} is not introduced to xenstored"),
            ));
        }
        let (ours, theirs) = UnixStream::pair()?;
        conn::spawn(self, ours, u32::from(domid))?;
        Ok(theirs)
    }

    pub(crate) fn register_conn(&self, domid: u32, out: Arc<conn::Outbox>, s: UnixStream) -> u64 {
        lock(&self.state).add_conn(domid, out, s)
    }

    pub(crate) fn conn_domid(&self, id: u64) -> Option<u32> {
        lock(&self.state).conn_domid(id)
    }

    pub(crate) fn drop_conn(&self, id: u64) {
        lock(&self.state).remove_conn(id);
    }

    /// Handles one request; false once the connection is gone.
    pub(crate) fn process(&self, id: u64, m: &Message) -> bool {
        lock(&self.state).process(id, m)
    }

    /// Introduces `domid`: creates its accounting and fires `@introduceDomain`. Returns
    /// false (and does nothing) if it is dom0 or already introduced. Creating
    /// `/local/domain/<domid>` is the toolstack's job: see [`Xenstored::create_domain_home`].
    pub fn introduce_domain(&self, domid: DomId) -> bool {
        let mut st = lock(&self.state);
        if st.is_introduced(u32::from(domid)) {
            return false;
        }
        st.introduce(u32::from(domid)).is_ok()
    }

    /// Releases `domid`: closes its connections (dropping their watches and
    /// transactions), forgets it in every permission list so a later domain with the same
    /// id inherits nothing (XSA-322), and fires `@releaseDomain`. `ENOENT` if it is not
    /// Returns false if it was not introduced (or is dom0). Its nodes stay until the
    /// toolstack removes them.
    pub fn release_domain(&self, domid: DomId) -> bool {
        lock(&self.state).release(u32::from(domid)).is_ok()
    }

    /// Whether `domid` is dom0 or an introduced domain.
    pub fn is_domain_introduced(&self, domid: DomId) -> bool {
        lock(&self.state).is_introduced(u32::from(domid))
    }

    /// Makes `domid` a device model for `target` (SET_TARGET): it gets the target's
    /// access everywhere. Both must be introduced (`ENOENT`).
    pub fn set_target(&self, domid: DomId, target: DomId) -> Result<(), XsError> {
        lock(&self.state).set_target(u32::from(domid), u32::from(target))
    }

    /// Creates `/local/domain/<domid>` (and missing parents) as dom0, owned by `domid`
    /// with no access for other domains, and returns the path. (libxl instead makes the
    /// home dom0-owned and readable by the domain, with domain-owned subdirectories.)
    pub fn create_domain_home(&self, domid: DomId) -> Result<String, XsError> {
        let home = domain_path(u32::from(domid));
        self.mkdir(0, &home)?;
        self.set_perms(
            0,
            &home,
            &[Perm {
                kind: PermKind::None,
                domid: u32::from(domid),
            }],
        )?;
        Ok(home)
    }

    /// Reads a node as `domid` (`path` absolute or relative to the domain's home).
    pub fn read(&self, domid: DomId, path: &str) -> Result<Vec<u8>, XsError> {
        let mut st = lock(&self.state);
        let domid = u32::from(domid);
        let p = st.path(domid, path)?;
        st.direct(domid, |s, who, _| ops::read(s, who, &p))
    }

    /// Writes a node as `domid`, creating it and missing parents; fires watches.
    pub fn write(&self, domid: DomId, path: &str, value: &[u8]) -> Result<(), XsError> {
        let mut st = lock(&self.state);
        let domid = u32::from(domid);
        let p = st.path(domid, path)?;
        st.direct(domid, |s, who, lim| {
            ops::write(s, who, lim, &p, value.to_vec())
        })
    }

    /// Creates a node (empty value) as `domid` if it does not exist; fires watches if it
    /// was created.
    pub fn mkdir(&self, domid: DomId, path: &str) -> Result<(), XsError> {
        let mut st = lock(&self.state);
        let domid = u32::from(domid);
        let p = st.path(domid, path)?;
        st.direct(domid, |s, who, lim| ops::mkdir(s, who, lim, &p))
    }

    /// Removes a node and everything below it as `domid`; fires watches. Removing a
    /// missing node whose parent exists succeeds.
    pub fn rm(&self, domid: DomId, path: &str) -> Result<(), XsError> {
        let mut st = lock(&self.state);
        let domid = u32::from(domid);
        let p = st.path(domid, path)?;
        st.direct(domid, |s, who, _| ops::rm(s, who, &p))
    }

    /// The children of a node, in creation order, as `domid`.
    pub fn directory(&self, domid: DomId, path: &str) -> Result<Vec<String>, XsError> {
        let mut st = lock(&self.state);
        let domid = u32::from(domid);
        let p = st.path(domid, path)?;
        st.direct(domid, |s, who, _| Ok(ops::directory(s, who, &p)?.children))
    }

    /// A node's permission list, as `domid`.
    pub fn get_perms(&self, domid: DomId, path: &str) -> Result<Vec<Perm>, XsError> {
        let mut st = lock(&self.state);
        let domid = u32::from(domid);
        let p = st.path(domid, path)?;
        st.direct(domid, |s, who, _| ops::get_perms(s, who, &p))
    }

    /// Replaces a node's permission list as `domid` (owner or dom0 only; a domU may not
    /// change the owner); fires watches.
    pub fn set_perms(&self, domid: DomId, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        let mut st = lock(&self.state);
        let domid = u32::from(domid);
        let p = st.path(domid, path)?;
        st.direct(domid, |s, who, lim| {
            ops::set_perms(s, who, lim, &p, perms.to_vec())
        })
    }

    /// Nodes owned by `domid` (what its node quota counts).
    pub fn domain_node_count(&self, domid: DomId) -> usize {
        lock(&self.state).node_count(u32::from(domid))
    }

    /// Nodes in the store.
    pub fn node_count(&self) -> usize {
        lock(&self.state).total_nodes()
    }

    /// Closes every client connection (listeners keep accepting new ones). For an
    /// orderly shutdown: drop the [`Listener`]s, then call this.
    pub fn close_all_connections(&self) {
        lock(&self.state).remove_all_conns();
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        lock(&self.state).conn_count()
    }

    /// Output queued for the connections of `domid`.
    pub fn queued_output(&self, domid: DomId) -> QueuedOutput {
        let (replies, events, event_bytes) = lock(&self.state).queued(u32::from(domid));
        QueuedOutput {
            replies,
            events,
            event_bytes,
        }
    }

    /// Watch events dropped so far for the connections of `domid` that are still open
    /// (duplicates, over budget, too old).
    pub fn dropped_events(&self, domid: DomId) -> u64 {
        lock(&self.state).dropped_events(u32::from(domid))
    }
}

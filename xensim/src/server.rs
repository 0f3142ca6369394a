//! The xensim daemon: serves [`crate::client::SimHost`] clients on a unix socket.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{debug, info};
use xen::{DomId, Gfn, Port, PAGE_SIZE};

use crate::host::{CopyBuf, Host};
use crate::proto::{decode, encode, Request, Response, MAX_MSG};
use crate::sys;

/// A running daemon. Dropping it stops accepting; open connections finish on their own.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    listener: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `host` on a new SOCK_SEQPACKET socket at `path` (replacing a stale socket file).
    pub fn start(host: Arc<Host>, path: &Path) -> io::Result<Server> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let listener = Arc::new(sys::seqpacket_listen(path)?);
        let l = listener.clone();
        let thread = std::thread::Builder::new()
            .name("xensim-accept".into())
            .spawn(move || loop {
                match sys::seqpacket_accept(l.as_fd()) {
                    Ok(conn) => {
                        let host = host.clone();
                        let _ = std::thread::Builder::new()
                            .name("xensim-conn".into())
                            .spawn(move || Connection::new(host).run(conn));
                    }
                    Err(e)
                        if e.raw_os_error() == Some(libc::EINTR)
                            || e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                    Err(_) => break, // shut down
                }
            })?;
        info!(socket = %path.display(), "xensim host listening");
        Ok(Server {
            path: path.to_path_buf(),
            listener,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves one already-connected socket (for in-process clients built on a socketpair).
    pub fn serve_connection(host: Arc<Host>, conn: OwnedFd) -> io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("xensim-conn".into())
            .spawn(move || Connection::new(host).run(conn))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug)]
struct MapRec {
    granter: DomId,
    refs: Vec<u32>,
    frames: Vec<Gfn>,
    writable: bool,
    notify: Option<(Option<u64>, Option<Port>)>,
}

struct Connection {
    host: Arc<Host>,
    domid: Option<DomId>,
    kind: String,
    maps: HashMap<u64, MapRec>,
    ports: HashSet<Port>,
    next_token: u64,
}

fn err(errno: i32, msg: impl Into<String>) -> Response {
    Response::Err {
        errno,
        msg: msg.into(),
    }
}

impl Connection {
    fn new(host: Arc<Host>) -> Self {
        Connection {
            host,
            domid: None,
            kind: String::new(),
            maps: HashMap::new(),
            ports: HashSet::new(),
            next_token: 1,
        }
    }

    fn run(mut self, conn: OwnedFd) {
        let mut buf = vec![0u8; MAX_MSG];
        loop {
            let (n, _fds) = match sys::recv_with_fds(conn.as_fd(), &mut buf) {
                Ok((0, _)) => break,
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "xensim connection read failed");
                    break;
                }
            };
            let (rsp, fds) = match decode::<Request>(&buf[..n]) {
                Ok(req) => self.handle(req),
                Err(e) => (
                    err(libc::EINVAL, format!("undecodable request: {e}")),
                    Vec::new(),
                ),
            };
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
            if let Err(e) = sys::send_with_fds(conn.as_fd(), &encode(&rsp), &borrowed) {
                debug!(error = %e, "xensim connection write failed");
                break;
            }
        }
        self.cleanup();
    }

    /// What the kernel does when a process closes /dev/xen/{evtchn,gntdev}: unmap every
    /// grant (with its unmap notification) and close every port.
    fn cleanup(&mut self) {
        let tokens: Vec<u64> = self.maps.keys().copied().collect();
        for t in tokens {
            self.unmap(t);
        }
        if let Some(domid) = self.domid {
            for p in self.ports.drain() {
                let _ = self.host.evtchn_close(domid, p);
            }
            debug!(domid, kind = %self.kind, "xensim handle closed");
        }
    }

    fn unmap(&mut self, token: u64) -> bool {
        let Some(m) = self.maps.remove(&token) else {
            return false;
        };
        // As gntdev_put_map: clear the byte while still mapped, unmap (unpin the grants),
        // and only then send the event, so a frontend that reacts to it can revoke at once.
        let (clear, port) = m.notify.unwrap_or((None, None));
        if let Some(off) = clear {
            let page = (off as usize) / PAGE_SIZE;
            if let (true, Some(frame)) = (m.writable, m.frames.get(page)) {
                self.host
                    .clear_granted_byte(m.granter, *frame, off as usize % PAGE_SIZE);
            }
        }
        self.host.grant_unmap(m.granter, &m.refs, m.writable);
        if let (Some(p), Some(domid)) = (port, self.domid) {
            let _ = self.host.evtchn_send(domid, p);
        }
        true
    }

    fn handle(&mut self, req: Request) -> (Response, Vec<OwnedFd>) {
        let domid = match (&req, self.domid) {
            (Request::Hello { domid, kind }, None) => {
                if !self.host.has_domain(*domid) {
                    return (
                        err(libc::ESRCH, format!("dom{domid} does not exist")),
                        Vec::new(),
                    );
                }
                self.domid = Some(*domid);
                self.kind = kind.clone();
                debug!(domid, kind = %kind, "xensim handle opened");
                return (Response::Ok, Vec::new());
            }
            (Request::Hello { .. }, Some(_)) => {
                return (err(libc::EISCONN, "hello sent twice"), Vec::new())
            }
            (_, None) => return (err(libc::ENOTCONN, "hello must come first"), Vec::new()),
            (_, Some(d)) => d,
        };
        let host = self.host.clone();
        let e = |x: crate::host::HostError| (err(x.errno(), x.to_string()), Vec::new());
        match req {
            Request::Hello { .. } => (err(libc::EISCONN, "hello sent twice"), Vec::new()),
            Request::Xenstore => match host.xenstored().connect_as(domid) {
                Ok(s) => (Response::Ok, vec![OwnedFd::from(s)]),
                Err(x) => (
                    err(x.raw_os_error().unwrap_or(libc::EIO), x.to_string()),
                    Vec::new(),
                ),
            },
            Request::EvtchnBindInterdomain {
                remote,
                remote_port,
            } => match host.evtchn_bind_interdomain(domid, remote, remote_port) {
                Ok(b) => match (b.incoming.try_clone_fd(), b.peer.try_clone_fd()) {
                    (Ok(i), Ok(p)) => {
                        self.ports.insert(b.port);
                        (Response::Port(b.port), vec![i, p])
                    }
                    (Err(x), _) | (_, Err(x)) => {
                        let _ = host.evtchn_close(domid, b.port);
                        (err(libc::EMFILE, x.to_string()), Vec::new())
                    }
                },
                Err(x) => e(x),
            },
            Request::EvtchnAllocUnbound { remote } => {
                match host.evtchn_alloc_unbound(domid, remote) {
                    Ok((port, incoming)) => match incoming.try_clone_fd() {
                        Ok(i) => {
                            self.ports.insert(port);
                            (Response::Port(port), vec![i])
                        }
                        Err(x) => {
                            let _ = host.evtchn_close(domid, port);
                            (err(libc::EMFILE, x.to_string()), Vec::new())
                        }
                    },
                    Err(x) => e(x),
                }
            }
            Request::EvtchnPeer { port } => {
                if !self.ports.contains(&port) {
                    return (
                        err(
                            libc::EINVAL,
                            format!("port {port} is not bound through this handle"),
                        ),
                        Vec::new(),
                    );
                }
                match host.evtchn_peer(domid, port) {
                    Ok(Some(p)) => match p.try_clone_fd() {
                        Ok(fd) => (Response::Peer(true), vec![fd]),
                        Err(x) => (err(libc::EMFILE, x.to_string()), Vec::new()),
                    },
                    Ok(None) => (Response::Peer(false), Vec::new()),
                    Err(x) => e(x),
                }
            }
            Request::EvtchnClose { port } => {
                if !self.ports.remove(&port) {
                    return (
                        err(
                            libc::EINVAL,
                            format!("port {port} is not bound through this handle"),
                        ),
                        Vec::new(),
                    );
                }
                match host.evtchn_close(domid, port) {
                    Ok(()) => (Response::Ok, Vec::new()),
                    Err(x) => e(x),
                }
            }
            Request::RamFd { domid: target } => {
                if domid != 0 {
                    return (
                        err(libc::EPERM, "only dom0 may map foreign RAM"),
                        Vec::new(),
                    );
                }
                match host.dup_ram_fd(target) {
                    Ok((fd, pages)) => (Response::Ram(pages), vec![fd]),
                    Err(x) => e(x),
                }
            }
            Request::GntMap {
                domid: granter,
                refs,
                writable,
            } => {
                if refs.is_empty() || refs.len() > 4096 {
                    return (
                        err(libc::EINVAL, format!("{} refs in one mapping", refs.len())),
                        Vec::new(),
                    );
                }
                match host.grant_map(domid, granter, &refs, writable) {
                    Ok(frames) => {
                        let token = self.next_token;
                        self.next_token += 1;
                        self.maps.insert(
                            token,
                            MapRec {
                                granter,
                                refs,
                                frames: frames.clone(),
                                writable,
                                notify: None,
                            },
                        );
                        (Response::Mapped { token, frames }, Vec::new())
                    }
                    Err((index, status)) => (
                        Response::MapFailed {
                            index: index as u32,
                            status,
                        },
                        Vec::new(),
                    ),
                }
            }
            Request::GntUnmap { token } => {
                if self.unmap(token) {
                    (Response::Ok, Vec::new())
                } else {
                    (err(libc::ENOENT, format!("no mapping {token}")), Vec::new())
                }
            }
            Request::GntSetUnmapNotify {
                token,
                clear_byte,
                port,
            } => {
                let (len, writable) = match self.maps.get(&token) {
                    Some(m) => (m.frames.len() * PAGE_SIZE, m.writable),
                    None => return (err(libc::ENOENT, format!("no mapping {token}")), Vec::new()),
                };
                if clear_byte.is_some() && !writable {
                    // gntdev refuses UNMAP_NOTIFY_CLEAR_BYTE on a read-only mapping.
                    return (
                        err(libc::EINVAL, "clear-byte notify on a read-only mapping"),
                        Vec::new(),
                    );
                }
                if clear_byte.is_some_and(|b| b as usize >= len) {
                    return (
                        err(libc::EINVAL, "clear byte outside the mapping"),
                        Vec::new(),
                    );
                }
                if port.is_some_and(|p| host.evtchn_status(domid, p).is_err()) {
                    // gntdev takes a reference on the port (evtchn_get): it must be a port of
                    // the caller's domain, bound through any event-channel handle.
                    return (
                        err(
                            libc::EINVAL,
                            "notify port is not an event channel of this domain",
                        ),
                        Vec::new(),
                    );
                }
                if let Some(m) = self.maps.get_mut(&token) {
                    m.notify = Some((clear_byte, port));
                }
                (Response::Ok, Vec::new())
            }
            Request::GntCopy { segs } => {
                let mut status = Vec::with_capacity(segs.len());
                let mut data = Vec::with_capacity(segs.len());
                for s in segs {
                    match s.to_guest {
                        Some(bytes) => {
                            status.push(host.grant_copy(
                                domid,
                                s.domid,
                                s.gref,
                                s.offset,
                                CopyBuf::ToGuest(&bytes),
                            ));
                            data.push(Vec::new());
                        }
                        None => {
                            let mut buf = vec![0u8; usize::from(s.len).min(PAGE_SIZE)];
                            status.push(host.grant_copy(
                                domid,
                                s.domid,
                                s.gref,
                                s.offset,
                                CopyBuf::FromGuest(&mut buf),
                            ));
                            data.push(buf);
                        }
                    }
                }
                (Response::Copied { status, data }, Vec::new())
            }
            Request::ForeignMap {
                domid: target,
                gfns,
            } => {
                if domid != 0 {
                    return (
                        err(libc::EPERM, "only dom0 may map foreign frames"),
                        Vec::new(),
                    );
                }
                match host.check_foreign_frames(target, &gfns) {
                    Ok(()) => (Response::Ok, Vec::new()),
                    Err((index, errno)) => (
                        Response::ForeignFailed {
                            index: index as u32,
                            errno,
                        },
                        Vec::new(),
                    ),
                }
            }
            Request::Dm { domid: target, op } => {
                (crate::hvm::serve_dm(&host, domid, target, op), Vec::new())
            }
            Request::MapResource {
                domid: target,
                type_,
                id,
                frame,
                nr_frames,
            } => crate::hvm::serve_map_resource(&host, domid, target, type_, id, frame, nr_frames),
            Request::Domains => (
                Response::Domains(
                    host.domains()
                        .into_iter()
                        .map(|d| (d.id, d.name, d.ram_pages))
                        .collect(),
                ),
                Vec::new(),
            ),
        }
    }
}

//! The xensim daemon: serves [`crate::client::SimHost`] clients on a unix socket.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{debug, info};
use xen::abi::grant_table::GNTST_OKAY;
use xen::{DomId, Gfn, Port, PAGE_SIZE};

use crate::host::{CopyBuf, CopyPin, Host};
use crate::proto::{decode, encode, CopyIov, Request, Response, MAX_COPY_IOV, MAX_MSG};
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
    /// The process that sent the request being handled (SCM_CREDENTIALS).
    sender: Option<libc::pid_t>,
    /// Scratch iovecs for `GntCopyIov` (reused: no allocation per copy).
    iov_local: Vec<sys::Iov>,
    iov_remote: Vec<sys::Iov>,
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
            sender: None,
            iov_local: Vec::new(),
            iov_remote: Vec::new(),
        }
    }

    fn run(mut self, conn: OwnedFd) {
        let mut buf = vec![0u8; MAX_MSG];
        if let Err(e) = sys::pass_credentials(conn.as_fd()) {
            // Without the sender's pid, GntCopyIov is refused and clients copy through the
            // socket instead.
            debug!(error = %e, "SO_PASSCRED failed");
        }
        loop {
            let (n, _fds) = match sys::recv_with_creds(conn.as_fd(), &mut buf) {
                Ok((0, _, _)) => break,
                Ok((n, fds, pid)) => {
                    self.sender = pid.filter(|p| *p > 0);
                    (n, fds)
                }
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
            Request::GntCopyIov { segs } => (self.copy_iov(domid, &segs), Vec::new()),
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

    /// GNTTABOP_copy between granted pages and the sender's buffers: pin (Xen's checks,
    /// per-segment status), one process_vm_readv/writev per run of segments in the same
    /// direction (in order), unpin.
    fn copy_iov(&mut self, domid: DomId, segs: &[CopyIov]) -> Response {
        if segs.len() > MAX_COPY_IOV {
            return err(libc::EINVAL, format!("{} segments in one copy", segs.len()));
        }
        let Some(pid) = self.sender else {
            return Response::CopyRefused {
                errno: libc::ENOTSUP,
            };
        };
        let mut pins: Vec<CopyPin> = segs
            .iter()
            .map(|s| CopyPin::new(s.domid, s.gref, s.offset, usize::from(s.len), s.to_guest))
            .collect();
        let local_buf = &mut self.iov_local;
        let remote = &mut self.iov_remote;
        let done = self.host.grant_copy_pinned(domid, &mut pins, |pins, ram| {
            let mut moved_any = false;
            let mut i = 0;
            while i < pins.len() {
                let to_guest = pins[i].to_guest;
                let mut local = sys::LocalIovs::new(local_buf);
                remote.clear();
                let mut want = 0usize;
                while let (Some(p), Some(s)) = (pins.get(i), segs.get(i)) {
                    if p.to_guest != to_guest {
                        break;
                    }
                    i += 1;
                    if p.status != GNTST_OKAY || p.len == 0 {
                        continue;
                    }
                    let Some(mem) = ram.mem(p.granter) else {
                        return Err(libc::EFAULT);
                    };
                    // Adjacent ranges merge into one entry (a batch's buffers are usually
                    // packed back to back): the kernel pins the remote pages once per entry.
                    if !local.push(mem, p.ram_offset, p.len) {
                        return Err(libc::EFAULT);
                    }
                    push_iov(remote, s.addr as usize as *mut libc::c_void, p.len);
                    want += p.len;
                }
                if local.is_empty() {
                    continue;
                }
                match sys::process_vm_copy(pid, to_guest, &local, remote) {
                    Ok(n) if n == want => moved_any = true,
                    // The kernel stopped at an address of the sender that faults.
                    Ok(_) => return Err(libc::EFAULT),
                    Err(e) => {
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        if !moved_any && matches!(errno, libc::EPERM | libc::ENOSYS | libc::ESRCH) {
                            return Ok(Some(errno));
                        }
                        return Err(errno);
                    }
                }
            }
            Ok(None)
        });
        match done {
            Ok(None) => Response::CopyStatus(pins.iter().map(|p| p.status).collect()),
            Ok(Some(errno)) => Response::CopyRefused { errno },
            Err(errno) => err(errno, "grant copy: a buffer of the caller faulted"),
        }
    }
}

/// Appends `base..base+len` to `v`, extending the last entry if it ends at `base`.
fn push_iov(v: &mut Vec<sys::Iov>, base: *mut libc::c_void, len: usize) {
    if let Some(last) = v.last_mut() {
        if (last.iov_base as usize).wrapping_add(last.iov_len) == base as usize {
            last.iov_len += len;
            return;
        }
    }
    v.push(sys::Iov {
        iov_base: base,
        iov_len: len,
    });
}

#[cfg(test)]
mod tests {
    //! Grant copy by address (`GntCopyIov`): Xen's checks and statuses, data both ways, pins
    //! released, and the same answers as the in-process [`Host::grant_copy`].

    use super::*;
    use crate::client::SimHost;
    use crate::guest::Guest;
    use crate::host::GRANT_ENTRIES;
    use crate::proto::CopyIov;
    use xen::abi::grant_table::*;
    use xen::{CopyDir, CopySegment, XenHost};

    struct Rig {
        _dir: tempfile::TempDir,
        server: Server,
        host: Arc<Host>,
        guest: Guest,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new().unwrap();
        let server = Server::start(host.clone(), &dir.path().join("s")).unwrap();
        let domid = host.create_domain("guest", 64).unwrap();
        let guest = Guest::new(host.clone(), domid).unwrap();
        Rig {
            _dir: dir,
            server,
            host,
            guest,
        }
    }

    fn seg<'a>(domid: DomId, gref: u32, offset: u16, local: CopyDir<'a>) -> CopySegment<'a> {
        CopySegment {
            domid,
            gref,
            offset,
            local,
            status: 99,
        }
    }

    #[test]
    fn test_copy_iov_status_for_every_bad_case_matches_in_process_host() {
        let r = rig();
        let g = r.guest.domid();
        let page = r.guest.alloc_page().unwrap();
        let rw = r.guest.grant(0, page, false).unwrap();
        let ro = r.guest.grant(0, page, true).unwrap();
        let other = r.guest.grant(7, page, false).unwrap();
        let revoked = r.guest.grant(0, page, false).unwrap();
        let not_ram = r.guest.grant(0, page, false).unwrap();
        r.guest
            .write_grant_entry(not_ram, 0, 1 << 20, GTF_PERMIT_ACCESS)
            .unwrap();
        let transitive = r.guest.grant(0, page, false).unwrap();
        r.guest
            .write_grant_entry(transitive, 0, page as u32, GTF_TRANSITIVE)
            .unwrap();
        // Revoked last, so that no grant above reuses its reference.
        r.guest.end_access(revoked).unwrap();
        // (granter, gref, offset, len, to_guest, expected status)
        let cases: &[(DomId, u32, u16, usize, bool, i16)] = &[
            (g, rw, 0, 16, false, GNTST_OKAY),
            (g, rw, 0, 16, true, GNTST_OKAY),
            (g, ro, 8, 16, false, GNTST_OKAY),
            (g, ro, 8, 16, true, GNTST_GENERAL_ERROR),
            (g, other, 0, 16, false, GNTST_GENERAL_ERROR),
            (g, revoked, 0, 16, false, GNTST_GENERAL_ERROR),
            (g, transitive, 0, 16, false, GNTST_GENERAL_ERROR),
            (g, not_ram, 0, 16, false, GNTST_BAD_PAGE),
            (g, GRANT_ENTRIES, 0, 16, false, GNTST_BAD_GNTREF),
            (g, u32::MAX, 0, 16, false, GNTST_BAD_GNTREF),
            (g + 40, rw, 0, 16, false, GNTST_BAD_DOMAIN),
            // Straddles the end of the page, by one byte and from the last byte.
            (g, rw, 4081, 16, false, GNTST_BAD_COPY_ARG),
            (g, rw, 4095, 2, true, GNTST_BAD_COPY_ARG),
            (g, rw, 4096, 0, false, GNTST_OKAY),
            (g, rw, 0, PAGE_SIZE, true, GNTST_OKAY),
        ];
        let sim = SimHost::connect(r.server.path(), 0).unwrap();
        let gt = sim.open_gnttab().unwrap();
        let mut bufs: Vec<Vec<u8>> = cases.iter().map(|c| vec![0u8; c.3]).collect();
        let mut segs: Vec<CopySegment<'_>> = cases
            .iter()
            .zip(bufs.iter_mut())
            .map(|(c, b)| {
                let local = if c.4 {
                    CopyDir::ToGuest(&b[..])
                } else {
                    CopyDir::FromGuest(&mut b[..])
                };
                seg(c.0, c.1, c.2, local)
            })
            .collect();
        gt.copy(&mut segs).unwrap();
        for (i, (c, s)) in cases.iter().zip(&segs).enumerate() {
            assert_eq!(s.status, c.5, "case {i} through the daemon: {c:?}");
            let mut b = vec![0u8; c.3];
            let local = if c.4 {
                CopyBuf::ToGuest(&b)
            } else {
                CopyBuf::FromGuest(&mut b)
            };
            assert_eq!(
                r.host.grant_copy(0, c.0, c.1, c.2, local),
                c.5,
                "case {i} in process: {c:?}"
            );
        }
        for gref in [rw, ro, other, not_ram] {
            assert_eq!(
                r.guest.grant_flags(gref).unwrap() & (GTF_READING | GTF_WRITING),
                0,
                "gref {gref} left pinned"
            );
        }
    }

    #[test]
    fn test_copy_iov_moves_data_both_ways_in_order() {
        let r = rig();
        let g = r.guest.domid();
        let a = r.guest.alloc_page().unwrap();
        let b = r.guest.alloc_page().unwrap();
        let pattern: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 + 3) as u8).collect();
        r.guest.write_page(a, 0, &pattern).unwrap();
        let ra = r.guest.grant(0, a, false).unwrap();
        let rb = r.guest.grant(0, b, false).unwrap();
        let sim = SimHost::connect(r.server.path(), 0).unwrap();
        let gt = sim.open_gnttab().unwrap();

        let mut whole = vec![0u8; PAGE_SIZE];
        let mut tail = [0u8; 100];
        let mut again = [0u8; 5];
        let mut segs = [
            seg(g, ra, 0, CopyDir::FromGuest(&mut whole)),
            seg(g, ra, 3996, CopyDir::FromGuest(&mut tail)),
            seg(g, rb, 10, CopyDir::ToGuest(b"hello")),
            // Reads what the previous segment wrote: segments are done in order.
            seg(g, rb, 10, CopyDir::FromGuest(&mut again)),
        ];
        gt.copy(&mut segs).unwrap();
        assert!(segs.iter().all(|s| s.status == GNTST_OKAY));
        assert_eq!(whole, pattern);
        assert_eq!(&tail[..], &pattern[3996..]);
        assert_eq!(&again, b"hello");
        let mut w = [0u8; 5];
        r.guest.read_page(b, 10, &mut w).unwrap();
        assert_eq!(&w, b"hello");
        for gref in [ra, rb] {
            assert_eq!(
                r.guest.grant_flags(gref).unwrap() & (GTF_READING | GTF_WRITING),
                0
            );
        }
        // A revoke right after the copy succeeds (the guest sees no pin left).
        r.guest.end_access(ra).unwrap();
    }

    /// A raw client connection that speaks the protocol directly.
    fn raw_client(r: &Rig) -> OwnedFd {
        let fd = sys::seqpacket_connect(r.server.path()).unwrap();
        let rsp = raw_call(
            &fd,
            &Request::Hello {
                domid: 0,
                kind: "test".into(),
            },
        );
        assert!(matches!(rsp, Response::Ok), "{rsp:?}");
        fd
    }

    fn raw_call(fd: &OwnedFd, req: &Request) -> Response {
        sys::send_with_fds(fd.as_fd(), &encode(req), &[]).unwrap();
        let mut buf = vec![0u8; MAX_MSG];
        let (n, _) = sys::recv_with_fds(fd.as_fd(), &mut buf).unwrap();
        decode(&buf[..n]).unwrap()
    }

    #[test]
    fn test_copy_iov_faulting_buffer_is_efault_and_releases_pins() {
        let r = rig();
        let g = r.guest.domid();
        let page = r.guest.alloc_page().unwrap();
        r.guest.write_page(page, 0, b"untouched").unwrap();
        let gref = r.guest.grant(0, page, false).unwrap();
        let fd = raw_client(&r);
        let good = [7u8; 9];
        for to_guest in [false, true] {
            let rsp = raw_call(
                &fd,
                &Request::GntCopyIov {
                    segs: vec![
                        CopyIov {
                            domid: g,
                            gref,
                            offset: 100,
                            len: 9,
                            to_guest: true,
                            addr: good.as_ptr() as u64,
                        },
                        CopyIov {
                            domid: g,
                            gref,
                            offset: 0,
                            len: 9,
                            to_guest,
                            addr: 8, // never mapped
                        },
                    ],
                },
            );
            match rsp {
                Response::Err { errno, .. } => assert_eq!(errno, libc::EFAULT),
                other => panic!("expected EFAULT, got {other:?}"),
            }
            assert_eq!(
                r.guest.grant_flags(gref).unwrap() & (GTF_READING | GTF_WRITING),
                0
            );
        }
        let mut b = [0u8; 9];
        r.guest.read_page(page, 0, &mut b).unwrap();
        assert_eq!(&b, b"untouched");
        // Too many segments for one call.
        let many = vec![
            CopyIov {
                domid: g,
                gref,
                offset: 0,
                len: 1,
                to_guest: false,
                addr: good.as_ptr() as u64,
            };
            MAX_COPY_IOV + 1
        ];
        match raw_call(&fd, &Request::GntCopyIov { segs: many }) {
            Response::Err { errno, .. } => assert_eq!(errno, libc::EINVAL),
            other => panic!("expected EINVAL, got {other:?}"),
        }
        assert_eq!(r.guest.grant_flags(gref).unwrap() & GTF_READING, 0);
    }

    #[test]
    fn test_copy_through_the_socket_fallback_gives_the_same_results() {
        let r = rig();
        let g = r.guest.domid();
        let page = r.guest.alloc_page().unwrap();
        r.guest.write_page(page, 50, b"fallback").unwrap();
        let rw = r.guest.grant(0, page, false).unwrap();
        let ro = r.guest.grant(0, page, true).unwrap();
        let sim = SimHost::connect(r.server.path(), 0).unwrap();
        let gt = crate::client::test_gnttab_without_copy_iov(&sim).unwrap();
        let mut got = [0u8; 8];
        let mut segs = [
            seg(g, rw, 50, CopyDir::FromGuest(&mut got)),
            seg(g, ro, 0, CopyDir::ToGuest(b"no")),
            seg(g, rw, 4090, CopyDir::ToGuest(b"straddles")),
            seg(g, rw, 0, CopyDir::ToGuest(b"yes")),
        ];
        gt.copy(&mut segs).unwrap();
        let st: Vec<i16> = segs.iter().map(|s| s.status).collect();
        assert_eq!(
            st,
            [
                GNTST_OKAY,
                GNTST_GENERAL_ERROR,
                GNTST_BAD_COPY_ARG,
                GNTST_OKAY
            ]
        );
        assert_eq!(&got, b"fallback");
        let mut w = [0u8; 3];
        r.guest.read_page(page, 0, &mut w).unwrap();
        assert_eq!(&w, b"yes");
        assert_eq!(r.guest.grant_flags(rw).unwrap() & GTF_READING, 0);
    }
}

//! `SimHost`: the `xen::XenHost` implementation that attaches to a xensim daemon, the way
//! `LinuxHost` attaches to Xen through `/dev/xen`.
//!
//! Each `open_*` opens a new connection (a new "device handle"). Grant and foreign mappings
//! map the guest's memfd, received once per domain, at the frames the host approved; event
//! notification writes the peer's eventfd directly, so the data path never crosses the socket.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use xen::{
    BufIoreq, CopyDir, CopySegment, DeviceModel, DmError, DomId, EventChannels, EvtchnError,
    ForeignError, ForeignMemory, Gfn, GrantError, GrantMapping, GrantRef, GrantTables, HostError,
    IoRange, IoServId, IoreqServerInfo, Port, Resource, SharedMem, XenHost, XsStream, XsTransport,
    PAGE_SIZE,
};

use crate::efd::EventFd;
use crate::mem;
use crate::proto::{
    decode, encode, CopyIov, CopySeg, DmOp, Request, Response, MAX_COPY_IOV, MAX_MSG,
};
use crate::sys;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection to the daemon.
#[derive(Debug)]
struct Conn {
    fd: OwnedFd,
    buf: Mutex<Vec<u8>>,
    /// Requests sent with [`Conn::post`] whose replies are still unread (guarded by `buf`'s
    /// lock, like every send and receive).
    posted: AtomicU32,
}

/// How long a caller polls for a reply before it sleeps (see [`Conn::recv_reply`]).
const REPLY_SPIN: Duration = Duration::from_micros(50);

/// Most posted requests in flight before `post` waits for their replies.
const MAX_POSTED: u32 = 64;

impl Conn {
    fn open(path: &Path, domid: DomId, kind: &str) -> io::Result<Arc<Conn>> {
        let fd = sys::seqpacket_connect(path)?;
        let c = Arc::new(Conn {
            fd,
            buf: Mutex::new(vec![0u8; MAX_MSG]),
            posted: AtomicU32::new(0),
        });
        match c
            .call(&Request::Hello {
                domid,
                kind: kind.to_string(),
            })?
            .0
        {
            Response::Ok => Ok(c),
            Response::Err { errno, msg } => Err(io::Error::new(
                io::Error::from_raw_os_error(errno).kind(),
                msg,
            )),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    fn call(&self, req: &Request) -> io::Result<(Response, Vec<OwnedFd>)> {
        self.call_raw(&encode(req))
    }

    /// Sends a request without waiting for its reply (an interrupt injection, which on Xen is
    /// a hypercall, not a round trip to another process). The daemon handles requests in
    /// order, so everything sent later sees its effect; its reply is read before the next
    /// call's, and a failure is logged there.
    fn post(&self, req: &Request) -> io::Result<()> {
        let mut buf = lock(&self.buf);
        if self.posted.load(Ordering::Relaxed) >= MAX_POSTED {
            self.drain_posted(&mut buf)?;
        }
        sys::send_with_fds(self.fd.as_fd(), &encode(req), &[])?;
        self.posted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Reads the replies of posted requests (the caller holds `buf`'s lock).
    fn drain_posted(&self, buf: &mut [u8]) -> io::Result<()> {
        while self.posted.load(Ordering::Relaxed) > 0 {
            let (n, _fds) = sys::recv_with_fds(self.fd.as_fd(), buf)?;
            self.posted.fetch_sub(1, Ordering::Relaxed);
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "xensim host closed the connection",
                ));
            }
            if let Ok(Response::Err { errno, msg }) = decode::<Response>(&buf[..n]) {
                tracing::warn!(errno, msg, "xensim: a posted device-model operation failed");
            }
        }
        Ok(())
    }

    /// Waits for the daemon's reply to a request just sent. A hypercall keeps its vCPU busy
    /// until it returns (Xen runs it on the caller's CPU), so the caller polls for the reply
    /// for up to [`REPLY_SPIN`] before it sleeps: on a VM whose idle vCPUs halt, the wakeup
    /// of a sleeping caller costs more than most hypercalls take.
    fn recv_reply(&self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        let start = Instant::now();
        loop {
            match sys::try_recv_with_fds(self.fd.as_fd(), buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
            if start.elapsed() >= REPLY_SPIN {
                return sys::recv_with_fds(self.fd.as_fd(), buf);
            }
            std::hint::spin_loop();
        }
    }

    /// Sends an encoded request and waits for its reply.
    fn call_raw(&self, req: &[u8]) -> io::Result<(Response, Vec<OwnedFd>)> {
        let mut buf = lock(&self.buf);
        self.drain_posted(&mut buf)?;
        sys::send_with_fds(self.fd.as_fd(), req, &[])?;
        let (n, fds) = self.recv_reply(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "xensim host closed the connection",
            ));
        }
        let rsp = decode::<Response>(&buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        Ok((rsp, fds))
    }
}

fn rsp_err(errno: i32, msg: &str) -> io::Error {
    let e = io::Error::from_raw_os_error(errno);
    io::Error::new(e.kind(), format!("{msg} ({e})"))
}

fn unexpected(r: &Response) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected reply from xensim host: {r:?}"),
    )
}

/// A xensim host reached through its daemon socket.
#[derive(Debug, Clone)]
pub struct SimHost {
    path: PathBuf,
    domid: DomId,
}

impl SimHost {
    /// Attaches to the daemon at `path` as `domid` (0 for a dom0 backend). Checks that the
    /// daemon answers.
    pub fn connect(path: impl Into<PathBuf>, domid: DomId) -> Result<SimHost, HostError> {
        let h = SimHost {
            path: path.into(),
            domid,
        };
        h.domains()?;
        Ok(h)
    }

    fn conn(&self, kind: &str) -> Result<Arc<Conn>, HostError> {
        Conn::open(&self.path, self.domid, kind).map_err(|source| HostError::Open {
            what: format!("xensim {kind} handle at {}", self.path.display()),
            source,
        })
    }

    /// The domains on the host: (id, name, RAM pages).
    pub fn domains(&self) -> Result<Vec<(DomId, String, u64)>, HostError> {
        let c = self.conn("query")?;
        match c.call(&Request::Domains) {
            Ok((Response::Domains(d), _)) => Ok(d),
            Ok((other, _)) => Err(HostError::Sim(format!("unexpected reply {other:?}"))),
            Err(e) => Err(HostError::Sim(e.to_string())),
        }
    }
}

impl XenHost for SimHost {
    fn describe(&self) -> String {
        format!("sim:{}", self.path.display())
    }
    fn own_domid(&self) -> DomId {
        self.domid
    }
    fn open_evtchn(&self) -> Result<Box<dyn EventChannels>, HostError> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| HostError::Open {
            what: "epoll".into(),
            source: e.into(),
        })?;
        Ok(Box::new(SimEvtchn {
            conn: self.conn("evtchn")?,
            epoll,
            ports: Mutex::new(HashMap::new()),
            restricted: Mutex::new(None),
        }))
    }
    fn open_gnttab(&self) -> Result<Box<dyn GrantTables>, HostError> {
        Ok(Box::new(SimGnttab {
            conn: self.conn("gnttab")?,
            ram: RamCache::default(),
            copy_iov: AtomicBool::new(true),
            scratch: Mutex::new(CopyScratch::default()),
        }))
    }
    fn open_foreign(&self) -> Result<Box<dyn ForeignMemory>, HostError> {
        Ok(Box::new(SimForeign {
            conn: self.conn("privcmd")?,
            ram: RamCache::default(),
            restricted: Mutex::new(None),
        }))
    }
    fn open_devmodel(&self) -> Result<Box<dyn DeviceModel>, HostError> {
        Ok(Box::new(SimDm {
            conn: self.conn("privcmd-dm")?,
            restricted: Mutex::new(None),
        }))
    }
    fn open_xenstore(&self, transport: &XsTransport) -> Result<XsStream, HostError> {
        let c = self.conn("xenstore")?;
        let what = || format!("xenstore via {}", self.describe());
        match c.call(&Request::Xenstore) {
            Ok((Response::Ok, mut fds)) if fds.len() == 1 => Ok(XsStream {
                file: File::from(fds.remove(0)),
                describe: format!("{} ({transport:?})", self.describe()),
            }),
            Ok((Response::Err { errno, msg }, _)) => Err(HostError::Open {
                what: what(),
                source: rsp_err(errno, &msg),
            }),
            Ok((other, _)) => Err(HostError::Open {
                what: what(),
                source: unexpected(&other),
            }),
            Err(source) => Err(HostError::Open {
                what: what(),
                source,
            }),
        }
    }
}

// ------------------------------------------------------------------ event channels

#[derive(Debug)]
struct PortRec {
    incoming: EventFd,
    peer: Option<EventFd>,
}

/// Event channels through the daemon; delivery and notification use eventfds directly.
#[derive(Debug)]
struct SimEvtchn {
    conn: Arc<Conn>,
    epoll: Epoll,
    ports: Mutex<HashMap<Port, PortRec>>,
    restricted: Mutex<Option<DomId>>,
}

impl SimEvtchn {
    fn op_err(
        op: &'static str,
        remote: Option<DomId>,
        port: Option<Port>,
        source: io::Error,
    ) -> EvtchnError {
        EvtchnError::Op {
            op,
            remote,
            port,
            source,
        }
    }

    fn check_restricted(&self, remote: DomId) -> Result<(), EvtchnError> {
        match *lock(&self.restricted) {
            Some(r) if r != remote => Err(EvtchnError::Restricted {
                restricted: r,
                requested: remote,
            }),
            _ => Ok(()),
        }
    }

    fn add(
        &self,
        port: Port,
        incoming: EventFd,
        peer: Option<EventFd>,
    ) -> Result<Port, EvtchnError> {
        self.epoll
            .add(
                incoming.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, u64::from(port)),
            )
            .map_err(|e| Self::op_err("epoll_add", None, Some(port), e.into()))?;
        lock(&self.ports).insert(port, PortRec { incoming, peer });
        Ok(port)
    }
}

impl EventChannels for SimEvtchn {
    fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port, EvtchnError> {
        self.check_restricted(remote)?;
        let op = "bind_interdomain";
        match self.conn.call(&Request::EvtchnBindInterdomain {
            remote,
            remote_port,
        }) {
            Ok((Response::Port(p), fds)) if fds.len() == 2 => {
                let mut it = fds.into_iter();
                let (i, pe) = (it.next(), it.next());
                match (i, pe) {
                    (Some(i), Some(pe)) => self.add(p, EventFd::from(i), Some(EventFd::from(pe))),
                    _ => Err(Self::op_err(
                        op,
                        Some(remote),
                        Some(remote_port),
                        unexpected(&Response::Port(p)),
                    )),
                }
            }
            Ok((Response::Err { errno, msg }, _)) => Err(Self::op_err(
                op,
                Some(remote),
                Some(remote_port),
                rsp_err(errno, &msg),
            )),
            Ok((other, _)) => Err(Self::op_err(
                op,
                Some(remote),
                Some(remote_port),
                unexpected(&other),
            )),
            Err(e) => Err(Self::op_err(op, Some(remote), Some(remote_port), e)),
        }
    }

    fn bind_unbound(&self, remote: DomId) -> Result<Port, EvtchnError> {
        self.check_restricted(remote)?;
        let op = "alloc_unbound";
        match self.conn.call(&Request::EvtchnAllocUnbound { remote }) {
            Ok((Response::Port(p), mut fds)) if fds.len() == 1 => {
                self.add(p, EventFd::from(fds.remove(0)), None)
            }
            Ok((Response::Err { errno, msg }, _)) => {
                Err(Self::op_err(op, Some(remote), None, rsp_err(errno, &msg)))
            }
            Ok((other, _)) => Err(Self::op_err(op, Some(remote), None, unexpected(&other))),
            Err(e) => Err(Self::op_err(op, Some(remote), None, e)),
        }
    }

    fn unbind(&self, port: Port) -> Result<(), EvtchnError> {
        let rec = lock(&self.ports)
            .remove(&port)
            .ok_or(EvtchnError::NotBound(port))?;
        let _ = self.epoll.delete(rec.incoming.as_fd());
        match self.conn.call(&Request::EvtchnClose { port }) {
            Ok((Response::Ok, _)) => Ok(()),
            Ok((Response::Err { errno, msg }, _)) => Err(Self::op_err(
                "close",
                None,
                Some(port),
                rsp_err(errno, &msg),
            )),
            Ok((other, _)) => Err(Self::op_err("close", None, Some(port), unexpected(&other))),
            Err(e) => Err(Self::op_err("close", None, Some(port), e)),
        }
    }

    fn notify(&self, port: Port) -> Result<(), EvtchnError> {
        let mut ports = lock(&self.ports);
        let rec = ports.get_mut(&port).ok_or(EvtchnError::NotBound(port))?;
        if rec.peer.is_none() {
            // Allocated unbound: learn the peer once it has bound (EVTCHNOP_send on an
            // unbound port does nothing in Xen either).
            match self.conn.call(&Request::EvtchnPeer { port }) {
                Ok((Response::Peer(true), mut fds)) if fds.len() == 1 => {
                    rec.peer = Some(EventFd::from(fds.remove(0)))
                }
                Ok((Response::Peer(false), _)) => return Ok(()),
                Ok((Response::Err { errno, msg }, _)) => {
                    return Err(Self::op_err("send", None, Some(port), rsp_err(errno, &msg)))
                }
                Ok((other, _)) => {
                    return Err(Self::op_err("send", None, Some(port), unexpected(&other)))
                }
                Err(e) => return Err(Self::op_err("send", None, Some(port), e)),
            }
        }
        match &rec.peer {
            Some(p) => p
                .signal()
                .map_err(|e| Self::op_err("send", None, Some(port), e)),
            None => Ok(()),
        }
    }

    fn unmask(&self, port: Port) -> Result<(), EvtchnError> {
        let ports = lock(&self.ports);
        let rec = ports.get(&port).ok_or(EvtchnError::NotBound(port))?;
        let mut ev = EpollEvent::new(EpollFlags::EPOLLIN, u64::from(port));
        self.epoll
            .modify(rec.incoming.as_fd(), &mut ev)
            .map_err(|e| Self::op_err("unmask", None, Some(port), e.into()))
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    fn pending(&self, out: &mut [Port]) -> Result<usize, EvtchnError> {
        let mut events = [EpollEvent::empty(); 64];
        let want = out.len().min(events.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self
            .epoll
            .wait(&mut events[..want], EpollTimeout::ZERO)
            .map_err(|e| Self::op_err("pending", None, None, e.into()))?;
        let ports = lock(&self.ports);
        let mut got = 0;
        for ev in &events[..n] {
            let port = ev.data() as Port;
            let Some(rec) = ports.get(&port) else {
                continue;
            };
            // Consume, then mask: delivered ports stay masked until unmask(), like the Linux
            // evtchn device. A failure on one port must not lose the ports already taken
            // (they are masked now and only the caller can unmask them), so report what we
            // have and leave this port readable for the next call.
            if let Err(e) = rec.incoming.take() {
                tracing::warn!(port, error = %e, "taking an event failed");
                break;
            }
            let mut off = EpollEvent::new(EpollFlags::empty(), u64::from(port));
            if let Err(e) = self.epoll.modify(rec.incoming.as_fd(), &mut off) {
                tracing::warn!(port, error = %e, "masking a port failed; reporting it anyway");
            }
            out[got] = port;
            got += 1;
        }
        Ok(got)
    }

    fn restrict(&self, domid: DomId) -> Result<(), EvtchnError> {
        let mut r = lock(&self.restricted);
        match *r {
            Some(cur) if cur != domid => Err(EvtchnError::Restricted {
                restricted: cur,
                requested: domid,
            }),
            _ => {
                *r = Some(domid);
                Ok(())
            }
        }
    }
}

// ------------------------------------------------------------------ memory

#[derive(Debug, Default)]
struct RamCache {
    fds: Mutex<HashMap<DomId, (Arc<OwnedFd>, u64)>>,
}

impl RamCache {
    fn get(&self, conn: &Conn, domid: DomId) -> io::Result<(Arc<OwnedFd>, u64)> {
        if let Some(v) = lock(&self.fds).get(&domid) {
            return Ok(v.clone());
        }
        match conn.call(&Request::RamFd { domid })? {
            (Response::Ram(pages), mut fds) if fds.len() == 1 => {
                let v = (Arc::new(fds.remove(0)), pages);
                lock(&self.fds).insert(domid, v.clone());
                Ok(v)
            }
            (Response::Err { errno, msg }, _) => Err(rsp_err(errno, &msg)),
            (other, _) => Err(unexpected(&other)),
        }
    }
}

/// Unpins the grants when the mapping is dropped (after its memory is unmapped).
#[derive(Debug)]
struct GrantUnmap {
    conn: Arc<Conn>,
    token: u64,
}

impl Drop for GrantUnmap {
    fn drop(&mut self) {
        let _ = self.conn.call(&Request::GntUnmap { token: self.token });
    }
}

#[derive(Debug)]
struct SimGnttab {
    conn: Arc<Conn>,
    ram: RamCache,
    /// Whether the host copies straight to and from our buffers (`GntCopyIov`); cleared for
    /// good when it says it cannot reach this process, after which copies carry the bytes.
    copy_iov: AtomicBool,
    scratch: Mutex<CopyScratch>,
}

/// A grant-table handle that copies through the socket from the start, as one does after
/// the host refused to reach this process (for tests of that path).
#[cfg(test)]
pub(crate) fn test_gnttab_without_copy_iov(h: &SimHost) -> Result<Box<dyn GrantTables>, HostError> {
    Ok(Box::new(SimGnttab {
        conn: h.conn("gnttab")?,
        ram: RamCache::default(),
        copy_iov: AtomicBool::new(false),
        scratch: Mutex::new(CopyScratch::default()),
    }))
}

/// Reused buffers of the copy path (no allocation per copy).
#[derive(Debug, Default)]
struct CopyScratch {
    segs: Vec<CopyIov>,
    msg: Vec<u8>,
}

impl SimGnttab {
    /// GNTTABOP_copy by address: Ok(false) if the host refused to reach our memory (nothing
    /// was copied and no status was set).
    fn copy_iov(&self, segs: &mut [CopySegment<'_>]) -> io::Result<bool> {
        let mut scratch = lock(&self.scratch);
        let CopyScratch { segs: wire, msg } = &mut *scratch;
        wire.clear();
        for s in segs.iter_mut() {
            let (addr, len, to_guest) = match &mut s.local {
                CopyDir::FromGuest(b) => (b.as_mut_ptr() as usize, b.len(), false),
                CopyDir::ToGuest(b) => (b.as_ptr() as usize, b.len(), true),
            };
            wire.push(CopyIov {
                domid: s.domid,
                gref: s.gref,
                offset: s.offset,
                // Checked by the caller: at most a page.
                len: len as u16,
                to_guest,
                addr: addr as u64,
            });
        }
        let req = Request::GntCopyIov {
            segs: std::mem::take(wire),
        };
        msg.clear();
        let encoded = postcard::to_io(&req, &mut *msg);
        if let Request::GntCopyIov { segs: w } = req {
            *wire = w;
        }
        encoded.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        // The host writes our FromGuest buffers (borrowed mutably by `segs` until we return)
        // while this call waits for its reply.
        match self.conn.call_raw(msg)? {
            (Response::CopyStatus(status), _) if status.len() == segs.len() => {
                for (s, st) in segs.iter_mut().zip(status) {
                    s.status = st;
                }
                Ok(true)
            }
            (Response::CopyRefused { errno }, _) => {
                tracing::debug!(
                    errno,
                    "xensim host cannot copy to this process; copying through the socket"
                );
                Ok(false)
            }
            (Response::Err { errno, msg }, _) => Err(rsp_err(errno, &msg)),
            (other, _) => Err(unexpected(&other)),
        }
    }
}

impl GrantTables for SimGnttab {
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<GrantMapping, GrantError> {
        if refs.is_empty() {
            return Err(GrantError::Invalid("empty grant batch"));
        }
        let os = |source| GrantError::Os {
            op: "map",
            domid,
            source,
        };
        match self
            .conn
            .call(&Request::GntMap {
                domid,
                refs: refs.to_vec(),
                writable,
            })
            .map_err(os)?
        {
            (Response::Mapped { token, frames }, _) => {
                let guard = GrantUnmap {
                    conn: self.conn.clone(),
                    token,
                };
                let (fd, _) = self.ram.get(&self.conn, domid).map_err(os)?;
                let mem = mem::map_frames_with(fd.as_fd(), &frames, writable, Box::new(guard))
                    .map_err(os)?;
                Ok(GrantMapping::new(mem, domid, token))
            }
            (Response::MapFailed { index, status }, _) => Err(GrantError::Map {
                domid,
                gref: refs.get(index as usize).copied().unwrap_or_default(),
                status,
            }),
            (Response::Err { errno, msg }, _) => Err(os(rsp_err(errno, &msg))),
            (other, _) => Err(os(unexpected(&other))),
        }
    }

    fn set_unmap_notify(
        &self,
        mapping: &GrantMapping,
        clear_byte: Option<usize>,
        port: Option<Port>,
    ) -> Result<(), GrantError> {
        let domid = mapping.domid();
        let os = |source| GrantError::Os {
            op: "set_unmap_notify",
            domid,
            source,
        };
        let req = Request::GntSetUnmapNotify {
            token: mapping.token(),
            clear_byte: clear_byte.map(|b| b as u64),
            port,
        };
        match self.conn.call(&req).map_err(os)? {
            (Response::Ok, _) => Ok(()),
            (Response::Err { errno, msg }, _) => Err(os(rsp_err(errno, &msg))),
            (other, _) => Err(os(unexpected(&other))),
        }
    }

    fn copy(&self, segs: &mut [CopySegment<'_>]) -> Result<(), GrantError> {
        let domid = segs.first().map_or(0, |s| s.domid);
        let os = |source| GrantError::Os {
            op: "copy",
            domid,
            source,
        };
        if segs.iter().any(|s| match &s.local {
            CopyDir::FromGuest(b) => b.len() > PAGE_SIZE,
            CopyDir::ToGuest(b) => b.len() > PAGE_SIZE,
        }) {
            return Err(GrantError::Invalid("grant copy segment longer than a page"));
        }
        if segs.is_empty() {
            return Ok(());
        }
        if self.copy_iov.load(Ordering::Relaxed) {
            for chunk in segs.chunks_mut(MAX_COPY_IOV) {
                if !self.copy_iov(chunk).map_err(os)? {
                    self.copy_iov.store(false, Ordering::Relaxed);
                    break;
                }
            }
            if self.copy_iov.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
        let mut wire = Vec::with_capacity(segs.len());
        for s in segs.iter() {
            let (len, to_guest) = match &s.local {
                CopyDir::FromGuest(b) => (b.len(), None),
                CopyDir::ToGuest(b) => (b.len(), Some(b.to_vec())),
            };
            if len > PAGE_SIZE {
                return Err(GrantError::Invalid("grant copy segment longer than a page"));
            }
            wire.push(CopySeg {
                domid: s.domid,
                gref: s.gref,
                offset: s.offset,
                len: len as u16,
                to_guest,
            });
        }
        match self
            .conn
            .call(&Request::GntCopy { segs: wire })
            .map_err(os)?
        {
            (Response::Copied { status, data }, _)
                if status.len() == segs.len() && data.len() == segs.len() =>
            {
                for ((s, st), d) in segs.iter_mut().zip(status).zip(data) {
                    s.status = st;
                    if let CopyDir::FromGuest(b) = &mut s.local {
                        if st == 0 && d.len() == b.len() {
                            b.copy_from_slice(&d);
                        }
                    }
                }
                Ok(())
            }
            (Response::Err { errno, msg }, _) => Err(os(rsp_err(errno, &msg))),
            (other, _) => Err(os(unexpected(&other))),
        }
    }
}

#[derive(Debug)]
struct SimForeign {
    conn: Arc<Conn>,
    ram: RamCache,
    restricted: Mutex<Option<DomId>>,
}

impl ForeignMemory for SimForeign {
    fn map(&self, domid: DomId, gfns: &[Gfn], writable: bool) -> Result<SharedMem, ForeignError> {
        if let Some(r) = *lock(&self.restricted) {
            if r != domid {
                return Err(ForeignError::Restricted {
                    restricted: r,
                    requested: domid,
                });
            }
        }
        let os = |source| ForeignError::Os {
            op: "mmapbatch",
            domid,
            source,
        };
        match self
            .conn
            .call(&Request::ForeignMap {
                domid,
                gfns: gfns.to_vec(),
            })
            .map_err(os)?
        {
            (Response::Ok, _) => {
                let (fd, _) = self.ram.get(&self.conn, domid).map_err(os)?;
                mem::map_frames(fd.as_fd(), gfns, writable).map_err(os)
            }
            (Response::ForeignFailed { index, errno }, _) => Err(ForeignError::Frame {
                domid,
                gfn: gfns.get(index as usize).copied().unwrap_or_default(),
                errno,
            }),
            (Response::Err { errno, msg }, _) => Err(os(rsp_err(errno, &msg))),
            (other, _) => Err(os(unexpected(&other))),
        }
    }

    fn map_resource(
        &self,
        domid: DomId,
        res: Resource,
        frame: u64,
        nr_frames: u64,
    ) -> Result<SharedMem, ForeignError> {
        if let Some(r) = *lock(&self.restricted) {
            if r != domid {
                return Err(ForeignError::Restricted {
                    restricted: r,
                    requested: domid,
                });
            }
        }
        let os = |source| ForeignError::Os {
            op: "mmap_resource",
            domid,
            source,
        };
        let (type_, id) = res.type_and_id();
        match self
            .conn
            .call(&Request::MapResource {
                domid,
                type_,
                id,
                frame,
                nr_frames,
            })
            .map_err(os)?
        {
            (Response::Resource, mut fds) if fds.len() == 1 => {
                let fd = fds.remove(0);
                let frames: Vec<u64> = (frame..frame.saturating_add(nr_frames)).collect();
                mem::map_frames(fd.as_fd(), &frames, true).map_err(os)
            }
            (Response::Err { errno, msg }, _) => Err(os(rsp_err(errno, &msg))),
            (other, _) => Err(os(unexpected(&other))),
        }
    }

    fn restrict(&self, domid: DomId) -> Result<(), ForeignError> {
        let mut r = lock(&self.restricted);
        match *r {
            Some(cur) if cur != domid => Err(ForeignError::Restricted {
                restricted: cur,
                requested: domid,
            }),
            _ => {
                *r = Some(domid);
                Ok(())
            }
        }
    }
}

/// Device-model operations through the daemon (HYPERVISOR_dm_op on the simulated host).
/// Arguments are checked here as `LinuxDm` checks them before the ioctl; the host checks
/// them again as Xen does.
#[derive(Debug)]
struct SimDm {
    conn: Arc<Conn>,
    restricted: Mutex<Option<DomId>>,
}

impl SimDm {
    fn call(&self, name: &'static str, domid: DomId, op: DmOp) -> Result<Response, DmError> {
        if let Some(r) = *lock(&self.restricted) {
            if r != domid {
                return Err(DmError::Restricted {
                    restricted: r,
                    requested: domid,
                });
            }
        }
        let os = |source| DmError::Op {
            op: name,
            domid,
            source,
        };
        match self.conn.call(&Request::Dm { domid, op }).map_err(os)? {
            (Response::Err { errno, msg }, _) => Err(os(rsp_err(errno, &msg))),
            (r, _) => Ok(r),
        }
    }

    /// XEN_DMOP_inject_msi, posted: the daemon applies it in order, a failure there is logged
    /// at the next call (see `Conn::post`). On Xen it is one hypercall; a round trip to the
    /// daemon per interrupt would make every virtio completion cost a process wakeup.
    fn post_ok(&self, name: &'static str, domid: DomId, op: DmOp) -> Result<(), DmError> {
        if let Some(r) = *lock(&self.restricted) {
            if r != domid {
                return Err(DmError::Restricted {
                    restricted: r,
                    requested: domid,
                });
            }
        }
        self.conn
            .post(&Request::Dm { domid, op })
            .map_err(|source| DmError::Op {
                op: name,
                domid,
                source,
            })
    }

    fn call_ok(&self, name: &'static str, domid: DomId, op: DmOp) -> Result<(), DmError> {
        match self.call(name, domid, op)? {
            Response::Ok => Ok(()),
            other => Err(DmError::Op {
                op: name,
                domid,
                source: unexpected(&other),
            }),
        }
    }

    fn range(name: &'static str, domid: DomId, range: IoRange) -> Result<(u32, u64, u64), DmError> {
        use xen::abi::dm_op::*;
        let invalid = |why| DmError::Invalid {
            op: name,
            domid,
            why,
        };
        match range {
            IoRange::Port { start, end } if start > end => {
                Err(invalid("port range ends before it starts"))
            }
            IoRange::Port { end, .. } if end > 0xffff => {
                Err(invalid("port range beyond port 0xffff"))
            }
            IoRange::Port { start, end } => Ok((XEN_DMOP_IO_RANGE_PORT, start, end)),
            IoRange::Mmio { start, end } if start > end => {
                Err(invalid("MMIO range ends before it starts"))
            }
            IoRange::Mmio { start, end } => Ok((XEN_DMOP_IO_RANGE_MEMORY, start, end)),
            IoRange::Pci { dev, func, .. } if dev > 0x1f || func > 7 => {
                Err(invalid("PCI device must be 0..=31 and function 0..=7"))
            }
            IoRange::Pci {
                seg,
                bus,
                dev,
                func,
            } => {
                let sbdf = xen_dmop_pci_sbdf(seg, bus, dev, func);
                Ok((XEN_DMOP_IO_RANGE_PCI, sbdf, sbdf))
            }
        }
    }
}

impl DeviceModel for SimDm {
    fn create_ioreq_server(&self, domid: DomId, b: BufIoreq) -> Result<IoServId, DmError> {
        use xen::abi::ioreq::{
            HVM_IOREQSRV_BUFIOREQ_ATOMIC, HVM_IOREQSRV_BUFIOREQ_LEGACY, HVM_IOREQSRV_BUFIOREQ_OFF,
        };
        let handle_bufioreq = match b {
            BufIoreq::Off => HVM_IOREQSRV_BUFIOREQ_OFF,
            BufIoreq::Legacy => HVM_IOREQSRV_BUFIOREQ_LEGACY,
            BufIoreq::Atomic => HVM_IOREQSRV_BUFIOREQ_ATOMIC,
        };
        let name = "create_ioreq_server";
        match self.call(name, domid, DmOp::CreateIoreqServer { handle_bufioreq })? {
            Response::IoServId(id) => Ok(id),
            other => Err(DmError::Op {
                op: name,
                domid,
                source: unexpected(&other),
            }),
        }
    }
    fn get_ioreq_server_info(
        &self,
        domid: DomId,
        id: IoServId,
        want_gfns: bool,
    ) -> Result<IoreqServerInfo, DmError> {
        let name = "get_ioreq_server_info";
        match self.call(name, domid, DmOp::GetIoreqServerInfo { id, want_gfns })? {
            Response::IoreqInfo { bufioreq_port } => Ok(IoreqServerInfo {
                bufioreq_port,
                ioreq_gfn: 0,
                bufioreq_gfn: 0,
            }),
            other => Err(DmError::Op {
                op: name,
                domid,
                source: unexpected(&other),
            }),
        }
    }
    fn map_io_range(&self, domid: DomId, id: IoServId, r: IoRange) -> Result<(), DmError> {
        let name = "map_io_range_to_ioreq_server";
        let (type_, start, end) = Self::range(name, domid, r)?;
        self.call_ok(
            name,
            domid,
            DmOp::MapIoRange {
                id,
                type_,
                start,
                end,
            },
        )
    }
    fn unmap_io_range(&self, domid: DomId, id: IoServId, r: IoRange) -> Result<(), DmError> {
        let name = "unmap_io_range_from_ioreq_server";
        let (type_, start, end) = Self::range(name, domid, r)?;
        self.call_ok(
            name,
            domid,
            DmOp::UnmapIoRange {
                id,
                type_,
                start,
                end,
            },
        )
    }
    fn set_ioreq_server_state(
        &self,
        domid: DomId,
        id: IoServId,
        enabled: bool,
    ) -> Result<(), DmError> {
        self.call_ok(
            "set_ioreq_server_state",
            domid,
            DmOp::SetIoreqServerState { id, enabled },
        )
    }
    fn destroy_ioreq_server(&self, domid: DomId, id: IoServId) -> Result<(), DmError> {
        self.call_ok(
            "destroy_ioreq_server",
            domid,
            DmOp::DestroyIoreqServer { id },
        )
    }
    fn remote_shutdown(&self, domid: DomId, reason: u32) -> Result<(), DmError> {
        self.call_ok("remote_shutdown", domid, DmOp::RemoteShutdown { reason })
    }
    fn set_isa_irq_level(&self, domid: DomId, irq: u8, level: bool) -> Result<(), DmError> {
        if irq > 15 {
            return Err(DmError::Invalid {
                op: "set_isa_irq_level",
                domid,
                why: "ISA IRQ must be 0..=15",
            });
        }
        self.call_ok(
            "set_isa_irq_level",
            domid,
            DmOp::SetIsaIrqLevel {
                irq,
                level: u8::from(level),
            },
        )
    }
    fn set_pci_intx_level(
        &self,
        domid: DomId,
        seg: u16,
        bus: u8,
        dev: u8,
        intx: u8,
        level: bool,
    ) -> Result<(), DmError> {
        let name = "set_pci_intx_level";
        if intx > 3 {
            return Err(DmError::Invalid {
                op: name,
                domid,
                why: "INTx must be 0..=3 (INTA..INTD)",
            });
        }
        if dev > 0x1f {
            return Err(DmError::Invalid {
                op: name,
                domid,
                why: "PCI device must be 0..=31",
            });
        }
        self.call_ok(
            name,
            domid,
            DmOp::SetPciIntxLevel {
                seg,
                bus,
                dev,
                intx,
                level: u8::from(level),
            },
        )
    }
    fn inject_msi(&self, domid: DomId, addr: u64, data: u32) -> Result<(), DmError> {
        self.post_ok("inject_msi", domid, DmOp::InjectMsi { addr, data })
    }
    fn restrict(&self, domid: DomId) -> Result<(), DmError> {
        let mut r = lock(&self.restricted);
        match *r {
            Some(cur) if cur != domid => Err(DmError::Restricted {
                restricted: cur,
                requested: domid,
            }),
            _ => {
                *r = Some(domid);
                Ok(())
            }
        }
    }
}

//! The simulated hypervisor: domains, event channels and grant tables.
//!
//! Every rule here follows Xen 4.17: grant mapping sets GTF_reading/GTF_writing with a
//! cmpxchg on the combined flags+domid word and fails with the same GNTST_* codes as
//! `xen/common/grant_table.c`; event channels follow `xen/common/event_channel.c` (a port is
//! unbound, or interdomain-bound to exactly one remote port; closing one end makes the other
//! unbound again; sending on an unbound port does nothing).

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use xen::abi::grant_table::*;
use xen::{DomId, Gfn, GrantRef, Port, SharedMem, PAGE_SIZE};

use crate::efd::EventFd;
use crate::mem::{self, MemFile};
use crate::toolstack::Toolstack;
use crate::xenstored::Xenstored;

/// Number of v1 grant-table frames per domain (Xen 4.17's default `gnttab_max_frames`).
pub const GRANT_FRAMES: u64 = 64;
/// Number of v1 grant entries per domain.
pub const GRANT_ENTRIES: u32 = (GRANT_FRAMES as u32) * (PAGE_SIZE / GRANT_ENTRY_V1_SIZE) as u32;
/// Event-channel ports per domain (2-level ABI limit on 64-bit is 4096).
pub const MAX_PORTS: u32 = 4096;

/// Errors of hypervisor operations, with the errno Xen would return.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// No such domain.
    #[error("dom{0} does not exist")]
    NoDomain(DomId),
    /// An event-channel operation failed.
    #[error("evtchn {op} on dom{domid} port {port}: {why}")]
    Evtchn {
        /// Operation.
        op: &'static str,
        /// Domain.
        domid: DomId,
        /// Port.
        port: Port,
        /// errno-like reason.
        why: &'static str,
        /// errno.
        errno: i32,
    },
    /// Out of memory, ports or frames.
    #[error("dom{domid}: out of {what}")]
    Exhausted {
        /// Domain.
        domid: DomId,
        /// What ran out.
        what: &'static str,
    },
    /// A request the host refuses (bad size, bad frame).
    #[error("dom{domid}: {why}")]
    Invalid {
        /// Domain.
        domid: DomId,
        /// Why.
        why: String,
    },
    /// An OS error creating memory or eventfds.
    #[error("host I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl HostError {
    /// The errno a hypercall would have returned.
    pub fn errno(&self) -> i32 {
        match self {
            HostError::NoDomain(_) => libc::ESRCH,
            HostError::Evtchn { errno, .. } => *errno,
            HostError::Exhausted { .. } => libc::ENOSPC,
            HostError::Invalid { .. } => libc::EINVAL,
            HostError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

#[derive(Debug)]
enum PortKind {
    Unbound { remote: DomId },
    Interdomain { remote: DomId, remote_port: Port },
}

#[derive(Debug)]
struct PortState {
    kind: PortKind,
    /// Signalled when an event is sent to this port (the "upcall" for this port).
    incoming: Arc<EventFd>,
}

/// A hasher for grant references (small integers, looked up twice per grant copy segment):
/// Fibonacci hashing spreads them over the whole word, as the table's probing wants.
#[derive(Debug, Default)]
struct RefHasher(u64);

impl std::hash::Hasher for RefHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

#[derive(Debug, Default)]
struct Active {
    mapper: DomId,
    frame: u32,
    readers: u32,
    writers: u32,
}

/// One simulated domain.
#[derive(Debug)]
pub struct Domain {
    id: DomId,
    name: String,
    ram: Option<MemFile>,
    gnttab: MemFile,
    ports: Vec<Option<PortState>>,
    active: HashMap<GrantRef, Active, BuildHasherDefault<RefHasher>>,
    /// The guest kernel's page and grant-reference allocator (see `Guest`).
    guest_alloc: Arc<Mutex<crate::guest::Alloc>>,
}

impl Domain {
    fn port(&self, port: Port) -> Option<&PortState> {
        self.ports.get(port as usize).and_then(Option::as_ref)
    }
    fn port_mut(&mut self, port: Port) -> Option<&mut PortState> {
        self.ports.get_mut(port as usize).and_then(Option::as_mut)
    }
    fn alloc_port(&mut self) -> Option<Port> {
        // Port 0 is never used (as in Xen).
        if let Some(i) = self.ports.iter().skip(1).position(Option::is_none) {
            return Some(i as Port + 1);
        }
        if self.ports.len() < MAX_PORTS as usize {
            self.ports.push(None);
            if self.ports.len() == 1 {
                self.ports.push(None);
            }
            return Some(self.ports.len() as Port - 1);
        }
        None
    }
}

/// What a successful interdomain bind returns.
#[derive(Debug, Clone)]
pub struct Bound {
    /// The new local port.
    pub port: Port,
    /// Signalled when the remote end sends.
    pub incoming: Arc<EventFd>,
    /// Signal this to send to the remote end.
    pub peer: Arc<EventFd>,
}

/// What a domain looks like from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// Domain id.
    pub id: DomId,
    /// Name.
    pub name: String,
    /// RAM pages (0 for dom0, whose memory is the host's own).
    pub ram_pages: u64,
}

#[derive(Debug)]
struct State {
    domains: BTreeMap<DomId, Domain>,
    next_domid: DomId,
}

/// The simulated Xen host.
#[derive(Debug)]
pub struct Host {
    state: Mutex<State>,
    xenstored: Arc<Xenstored>,
    /// HVM state of the HVM domains (see `crate::hvm`).
    hvm: Mutex<HashMap<DomId, Arc<crate::hvm::HvmDomain>>>,
}

fn evtchn_err(
    op: &'static str,
    domid: DomId,
    port: Port,
    why: &'static str,
    errno: i32,
) -> HostError {
    HostError::Evtchn {
        op,
        domid,
        port,
        why,
        errno,
    }
}

impl Host {
    /// A host with dom0 and a xenstored with cxenstored 4.17 quotas.
    pub fn new() -> Result<Arc<Host>, HostError> {
        let xenstored = Xenstored::new(Default::default());
        let host = Arc::new(Host {
            state: Mutex::new(State {
                domains: BTreeMap::new(),
                next_domid: 1,
            }),
            xenstored,
            hvm: Mutex::new(HashMap::new()),
        });
        host.insert_domain(0, "Domain-0", 0)?;
        Ok(host)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the tables half-updated in a way that
        // matters more than stopping the whole simulator, so recover the guard.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The host's xenstored.
    pub fn xenstored(&self) -> &Arc<Xenstored> {
        &self.xenstored
    }

    /// A dom0 toolstack connection to this host's xenstored.
    pub fn toolstack(&self) -> Result<Toolstack, String> {
        let s = self.xenstored.connect_as(0).map_err(|e| e.to_string())?;
        let xs = xenbus::XsClient::from_unix(s, "xensim toolstack").map_err(|e| e.to_string())?;
        Ok(Toolstack::new(xs))
    }

    fn insert_domain(&self, id: DomId, name: &str, ram_pages: u64) -> Result<(), HostError> {
        let ram = if ram_pages > 0 {
            Some(MemFile::new(&format!("xensim-d{id}-ram"), ram_pages)?)
        } else {
            None
        };
        let gnttab = MemFile::new(&format!("xensim-d{id}-gnttab"), GRANT_FRAMES)?;
        let d = Domain {
            id,
            name: name.to_string(),
            ram,
            gnttab,
            ports: Vec::new(),
            active: HashMap::default(),
            guest_alloc: Arc::default(),
        };
        self.lock().domains.insert(id, d);
        Ok(())
    }

    /// Creates a guest domain with `ram_pages` pages of RAM and introduces it to xenstored
    /// with the nodes libxl creates (`/local/domain/<id>` readable by the guest, `device`,
    /// `control`, `data` writable by it). Domain ids are not reused while the host lives.
    pub fn create_domain(&self, name: &str, ram_pages: u64) -> Result<DomId, HostError> {
        if ram_pages == 0 || ram_pages > (1 << 22) {
            return Err(HostError::Invalid {
                domid: 0,
                why: format!("guest RAM of {ram_pages} pages"),
            });
        }
        let id = {
            let mut st = self.lock();
            let id = st.next_domid;
            if id >= xen::DOMID_SELF {
                return Err(HostError::Exhausted {
                    domid: 0,
                    what: "domain ids",
                });
            }
            st.next_domid += 1;
            id
        };
        self.insert_domain(id, name, ram_pages)?;
        let nodes = self
            .toolstack()
            .and_then(|t| t.create_domain_nodes(id, name).map_err(|e| e.to_string()));
        if let Err(why) = nodes {
            self.lock().domains.remove(&id);
            return Err(HostError::Invalid {
                domid: id,
                why: format!("xenstore nodes for the new domain: {why}"),
            });
        }
        self.xenstored.introduce_domain(id);
        Ok(id)
    }

    /// Creates an HVM guest domain with `vcpus` vCPUs (see [`Host::create_domain`]); its
    /// port I/O, MMIO and PCI config accesses go to ioreq servers (`crate::hvm`).
    pub fn create_hvm_domain(
        &self,
        name: &str,
        ram_pages: u64,
        vcpus: u32,
    ) -> Result<DomId, HostError> {
        crate::hvm::HvmDomain::new(0, vcpus)?;
        let id = self.create_domain(name, ram_pages)?;
        let d = crate::hvm::HvmDomain::new(id, vcpus)?;
        self.hvm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::new(d));
        Ok(id)
    }

    /// The HVM state of a domain (None for PV domains and dom0).
    pub fn hvm_domain(&self, id: DomId) -> Option<Arc<crate::hvm::HvmDomain>> {
        self.hvm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// Destroys a domain: its ports close (peers become unbound), xenstored releases it
    /// (@releaseDomain), and its memory goes away once the last mapping of it is gone.
    pub fn destroy_domain(&self, id: DomId) -> Result<(), HostError> {
        if id == 0 {
            return Err(HostError::Invalid {
                domid: 0,
                why: "dom0 cannot be destroyed".into(),
            });
        }
        let ports: Vec<Port> = {
            let st = self.lock();
            let d = st.domains.get(&id).ok_or(HostError::NoDomain(id))?;
            (0..d.ports.len() as Port)
                .filter(|p| d.port(*p).is_some())
                .collect()
        };
        // As libxl_domain_destroy: the toolstack removes the domain's devices (backend
        // directories) and its home in xenstore first, then the domain dies, which makes
        // xenstored fire @releaseDomain.
        if let Ok(ts) = self.toolstack() {
            let xs = ts.xs();
            if let Ok(types) = xenbus::XsOps::directory(xs, "/local/domain/0/backend") {
                for t in types {
                    let _ = xenbus::XsOps::rm(xs, &format!("/local/domain/0/backend/{t}/{id}"));
                }
            }
            let _ = xenbus::XsOps::rm(xs, &format!("/local/domain/{id}"));
        }
        let hvm = self
            .hvm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(h) = hvm {
            h.destroy_all(self);
        }
        for p in ports {
            let _ = self.evtchn_close(id, p);
        }
        self.lock().domains.remove(&id);
        self.xenstored.release_domain(id);
        Ok(())
    }

    /// The domains that exist.
    pub fn domains(&self) -> Vec<DomainInfo> {
        self.lock()
            .domains
            .values()
            .map(|d| DomainInfo {
                id: d.id,
                name: d.name.clone(),
                ram_pages: d.ram.as_ref().map_or(0, MemFile::pages),
            })
            .collect()
    }

    /// Runs `f` with a domain's RAM file (for handing it to a client, or guest access).
    pub fn with_ram<R>(&self, id: DomId, f: impl FnOnce(&MemFile) -> R) -> Result<R, HostError> {
        let st = self.lock();
        let d = st.domains.get(&id).ok_or(HostError::NoDomain(id))?;
        let ram = d.ram.as_ref().ok_or(HostError::Invalid {
            domid: id,
            why: "domain has no RAM".into(),
        })?;
        Ok(f(ram))
    }

    /// The domain's guest-side page and grant-reference allocator, shared by all its
    /// [`crate::guest::Guest`] handles.
    pub(crate) fn guest_alloc(
        &self,
        id: DomId,
    ) -> Result<Arc<Mutex<crate::guest::Alloc>>, HostError> {
        let st = self.lock();
        Ok(st
            .domains
            .get(&id)
            .ok_or(HostError::NoDomain(id))?
            .guest_alloc
            .clone())
    }

    /// A mapping of the whole RAM of a domain (for its own guest-side drivers).
    pub fn map_ram(&self, id: DomId) -> Result<SharedMem, HostError> {
        self.with_ram(id, |ram| mem::map_fd(ram.fd(), 0, ram.mem().len(), true))?
            .map_err(HostError::Io)
    }

    /// A mapping of a domain's grant table (for its own guest-side grant code).
    pub fn map_grant_table(&self, id: DomId) -> Result<SharedMem, HostError> {
        let st = self.lock();
        let d = st.domains.get(&id).ok_or(HostError::NoDomain(id))?;
        Ok(mem::map_fd(d.gnttab.fd(), 0, d.gnttab.mem().len(), true)?)
    }

    // ---------------------------------------------------------------- event channels

    /// EVTCHNOP_alloc_unbound: a port of `domid` that `remote` may bind to.
    pub fn evtchn_alloc_unbound(
        &self,
        domid: DomId,
        remote: DomId,
    ) -> Result<(Port, Arc<EventFd>), HostError> {
        let mut st = self.lock();
        if !st.domains.contains_key(&remote) {
            return Err(HostError::NoDomain(remote));
        }
        let d = st
            .domains
            .get_mut(&domid)
            .ok_or(HostError::NoDomain(domid))?;
        let port = d.alloc_port().ok_or(HostError::Exhausted {
            domid,
            what: "event channel ports",
        })?;
        let incoming = Arc::new(EventFd::new()?);
        d.ports[port as usize] = Some(PortState {
            kind: PortKind::Unbound { remote },
            incoming: incoming.clone(),
        });
        Ok((port, incoming))
    }

    /// EVTCHNOP_bind_interdomain: binds a new port of `domid` to `remote_port` of `remote`,
    /// which must be unbound and allocated for `domid`.
    pub fn evtchn_bind_interdomain(
        &self,
        domid: DomId,
        remote: DomId,
        remote_port: Port,
    ) -> Result<Bound, HostError> {
        let mut st = self.lock();
        if !st.domains.contains_key(&domid) {
            return Err(HostError::NoDomain(domid));
        }
        let peer = {
            let rd = st.domains.get(&remote).ok_or(HostError::NoDomain(remote))?;
            match rd.port(remote_port) {
                Some(PortState {
                    kind: PortKind::Unbound { remote: allowed },
                    incoming,
                }) if *allowed == domid => incoming.clone(),
                Some(_) => {
                    return Err(evtchn_err(
                        "bind_interdomain",
                        remote,
                        remote_port,
                        "port not unbound for us",
                        libc::EINVAL,
                    ))
                }
                None => {
                    return Err(evtchn_err(
                        "bind_interdomain",
                        remote,
                        remote_port,
                        "no such port",
                        libc::EINVAL,
                    ))
                }
            }
        };
        let d = st
            .domains
            .get_mut(&domid)
            .ok_or(HostError::NoDomain(domid))?;
        let port = d.alloc_port().ok_or(HostError::Exhausted {
            domid,
            what: "event channel ports",
        })?;
        let incoming = Arc::new(EventFd::new()?);
        d.ports[port as usize] = Some(PortState {
            kind: PortKind::Interdomain {
                remote,
                remote_port,
            },
            incoming: incoming.clone(),
        });
        if let Some(rp) = st
            .domains
            .get_mut(&remote)
            .and_then(|rd| rd.port_mut(remote_port))
        {
            rp.kind = PortKind::Interdomain {
                remote: domid,
                remote_port: port,
            };
        }
        Ok(Bound {
            port,
            incoming,
            peer,
        })
    }

    /// EVTCHNOP_close: the remote end of an interdomain channel becomes unbound.
    pub fn evtchn_close(&self, domid: DomId, port: Port) -> Result<(), HostError> {
        let mut st = self.lock();
        let d = st
            .domains
            .get_mut(&domid)
            .ok_or(HostError::NoDomain(domid))?;
        let ps = d
            .ports
            .get_mut(port as usize)
            .and_then(Option::take)
            .ok_or_else(|| evtchn_err("close", domid, port, "no such port", libc::EINVAL))?;
        if let PortKind::Interdomain {
            remote,
            remote_port,
        } = ps.kind
        {
            if let Some(rp) = st
                .domains
                .get_mut(&remote)
                .and_then(|rd| rd.port_mut(remote_port))
            {
                rp.kind = PortKind::Unbound { remote: domid };
            }
        }
        Ok(())
    }

    /// EVTCHNOP_send: signals the remote end; nothing happens on an unbound port.
    pub fn evtchn_send(&self, domid: DomId, port: Port) -> Result<(), HostError> {
        let peer = self.evtchn_peer(domid, port)?;
        if let Some(p) = peer {
            p.signal()?;
        }
        Ok(())
    }

    /// The eventfd that sending on `port` signals, if the port is bound to a remote port.
    pub fn evtchn_peer(&self, domid: DomId, port: Port) -> Result<Option<Arc<EventFd>>, HostError> {
        let st = self.lock();
        let d = st.domains.get(&domid).ok_or(HostError::NoDomain(domid))?;
        match d.port(port).map(|p| &p.kind) {
            Some(PortKind::Interdomain {
                remote,
                remote_port,
            }) => Ok(st
                .domains
                .get(remote)
                .and_then(|rd| rd.port(*remote_port))
                .map(|p| p.incoming.clone())),
            Some(PortKind::Unbound { .. }) => Ok(None),
            None => Err(evtchn_err(
                "send",
                domid,
                port,
                "no such port",
                libc::EINVAL,
            )),
        }
    }

    /// The eventfd signalled when an event arrives on `port` of `domid`.
    pub fn evtchn_incoming(&self, domid: DomId, port: Port) -> Result<Arc<EventFd>, HostError> {
        let st = self.lock();
        let d = st.domains.get(&domid).ok_or(HostError::NoDomain(domid))?;
        d.port(port)
            .map(|p| p.incoming.clone())
            .ok_or_else(|| evtchn_err("status", domid, port, "no such port", libc::EINVAL))
    }

    /// The remote (domain, port) of an interdomain-bound port, as EVTCHNOP_status reports it.
    pub fn evtchn_status(
        &self,
        domid: DomId,
        port: Port,
    ) -> Result<Option<(DomId, Port)>, HostError> {
        let st = self.lock();
        let d = st.domains.get(&domid).ok_or(HostError::NoDomain(domid))?;
        match d.port(port).map(|p| &p.kind) {
            Some(PortKind::Interdomain {
                remote,
                remote_port,
            }) => Ok(Some((*remote, *remote_port))),
            Some(PortKind::Unbound { .. }) => Ok(None),
            None => Err(evtchn_err(
                "status",
                domid,
                port,
                "no such port",
                libc::EINVAL,
            )),
        }
    }

    // ---------------------------------------------------------------- grant tables

    /// Pins one grant of `granter` for `mapper` as GNTTABOP_map_grant_ref does and returns
    /// the granted frame. Fails with Xen's GNTST_* code.
    fn pin(
        st: &mut State,
        granter: DomId,
        gref: GrantRef,
        mapper: DomId,
        writable: bool,
    ) -> Result<u32, i16> {
        let d = st.domains.get_mut(&granter).ok_or(GNTST_BAD_DOMAIN)?;
        if gref >= GRANT_ENTRIES {
            return Err(GNTST_BAD_GNTREF);
        }
        let off = gref as usize * GRANT_ENTRY_V1_SIZE;
        let gt = d.gnttab.mem();
        let act = d.active.entry(gref).or_default();
        let pinned = act.readers + act.writers > 0;
        if pinned && act.mapper != mapper {
            return Err(GNTST_GENERAL_ERROR);
        }
        if !pinned || (writable && act.writers == 0) {
            // _set_status_v1: the combined flags (low half) and domid (high half) word.
            let mut word = gt
                .load_u32(off, Ordering::Acquire)
                .map_err(|_| GNTST_GENERAL_ERROR)?;
            let mut retries = 0;
            loop {
                let flags = word as u16;
                let domid = (word >> 16) as u16;
                if !pinned && ((flags & GTF_TYPE_MASK) != GTF_PERMIT_ACCESS || domid != mapper) {
                    return Err(GNTST_GENERAL_ERROR);
                }
                let mut new_flags = flags | GTF_READING;
                if writable {
                    new_flags |= GTF_WRITING;
                    if flags & GTF_READONLY != 0 {
                        return Err(GNTST_GENERAL_ERROR);
                    }
                }
                let new = (word & 0xffff_0000) | u32::from(new_flags);
                let prev = gt
                    .cmpxchg_u32(off, word, new)
                    .map_err(|_| GNTST_GENERAL_ERROR)?;
                if prev == word {
                    break;
                }
                retries += 1;
                if retries == 5 {
                    return Err(GNTST_GENERAL_ERROR); // "Shared grant entry is unstable"
                }
                word = prev;
            }
            if !pinned {
                act.frame = gt
                    .load_u32(off + 4, Ordering::Acquire)
                    .map_err(|_| GNTST_GENERAL_ERROR)?;
                act.mapper = mapper;
            }
        }
        let frame = act.frame;
        let ram_pages = d.ram.as_ref().map_or(0, MemFile::pages);
        if u64::from(frame) >= ram_pages {
            // The frame is not RAM of the granter: undo the status change.
            let act_now = act.readers + act.writers;
            if act_now == 0 {
                d.active.remove(&gref);
                let _ = gt.fetch_and_u16(off, !(GTF_READING | GTF_WRITING));
            }
            return Err(GNTST_BAD_PAGE);
        }
        if writable {
            act.writers += 1;
        } else {
            act.readers += 1;
        }
        Ok(frame)
    }

    fn unpin(st: &mut State, granter: DomId, gref: GrantRef, writable: bool) {
        let Some(d) = st.domains.get_mut(&granter) else {
            return;
        };
        let Some(act) = d.active.get_mut(&gref) else {
            return;
        };
        if writable {
            act.writers = act.writers.saturating_sub(1);
        } else {
            act.readers = act.readers.saturating_sub(1);
        }
        let off = gref as usize * GRANT_ENTRY_V1_SIZE;
        let mut clear = 0;
        if act.writers == 0 {
            clear |= GTF_WRITING;
        }
        if act.readers + act.writers == 0 {
            clear |= GTF_READING;
            d.active.remove(&gref);
        }
        if clear != 0 {
            let _ = d.gnttab.mem().fetch_and_u16(off, !clear);
        }
    }

    /// Maps a batch of grants (GNTTABOP_map_grant_ref for each): returns the frames, or the
    /// index and GNTST_* status of the first failure, in which case nothing stays pinned.
    pub fn grant_map(
        &self,
        mapper: DomId,
        granter: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<Vec<Gfn>, (usize, i16)> {
        let mut st = self.lock();
        if !st.domains.contains_key(&mapper) {
            return Err((0, GNTST_GENERAL_ERROR));
        }
        let mut frames = Vec::with_capacity(refs.len());
        for (i, r) in refs.iter().enumerate() {
            match Self::pin(&mut st, granter, *r, mapper, writable) {
                Ok(f) => frames.push(Gfn::from(f)),
                Err(status) => {
                    for done in &refs[..i] {
                        Self::unpin(&mut st, granter, *done, writable);
                    }
                    return Err((i, status));
                }
            }
        }
        Ok(frames)
    }

    /// Unmaps grants mapped by [`Host::grant_map`] (GNTTABOP_unmap_grant_ref).
    pub fn grant_unmap(&self, granter: DomId, refs: &[GrantRef], writable: bool) {
        let mut st = self.lock();
        for r in refs {
            Self::unpin(&mut st, granter, *r, writable);
        }
    }

    /// One GNTTABOP_copy segment between a granted page and a local buffer; the grant is
    /// pinned only for the duration of the copy. Returns the GNTST_* status.
    pub fn grant_copy(
        &self,
        mapper: DomId,
        granter: DomId,
        gref: GrantRef,
        offset: u16,
        local: CopyBuf<'_>,
    ) -> i16 {
        let mut seg = [CopyPin::new(
            granter,
            gref,
            offset,
            local.len(),
            matches!(local, CopyBuf::ToGuest(_)),
        )];
        let copied = self.grant_copy_pinned(mapper, &mut seg, |segs, ram| {
            let s = &segs[0];
            if s.status != GNTST_OKAY {
                return true;
            }
            let r = match (ram.mem(s.granter), local) {
                (Some(m), CopyBuf::FromGuest(buf)) => m.read(s.ram_offset, buf),
                (Some(m), CopyBuf::ToGuest(buf)) => m.write(s.ram_offset, buf),
                (None, _) => return false,
            };
            r.is_ok()
        });
        if copied {
            seg[0].status
        } else {
            GNTST_BAD_PAGE
        }
    }

    /// A batched GNTTABOP_copy whose local side is elsewhere (another process's buffers):
    /// checks and pins each segment's grant as Xen's acquire_grant_for_copy does (setting
    /// `status`; a segment that fails is skipped), runs `copy` with the pinned segments and a
    /// view of the granters' RAM (segments with status GNTST_okay may be copied at
    /// `ram_offset` for `len` bytes), then releases every pin it took. The host lock is held
    /// throughout, so no domain's RAM goes away during `copy`.
    pub fn grant_copy_pinned<T>(
        &self,
        mapper: DomId,
        segs: &mut [CopyPin],
        copy: impl FnOnce(&[CopyPin], &RamView<'_>) -> T,
    ) -> T {
        let mut st = self.lock();
        for s in segs.iter_mut() {
            s.status = if usize::from(s.offset) + s.len > PAGE_SIZE {
                GNTST_BAD_COPY_ARG
            } else {
                match Self::pin(&mut st, s.granter, s.gref, mapper, s.to_guest) {
                    Ok(frame) => {
                        s.ram_offset = frame as usize * PAGE_SIZE + usize::from(s.offset);
                        GNTST_OKAY
                    }
                    Err(status) => status,
                }
            };
        }
        let out = copy(segs, &RamView { st: &st });
        for s in segs.iter() {
            if s.status == GNTST_OKAY {
                Self::unpin(&mut st, s.granter, s.gref, s.to_guest);
            }
        }
        out
    }

    /// Checks that `gfns` are RAM of `domid` (what privcmd mmapbatch asks Xen); returns the
    /// index of the first frame that is not, with its errno.
    pub fn check_foreign_frames(&self, domid: DomId, gfns: &[Gfn]) -> Result<(), (usize, i32)> {
        let st = self.lock();
        let pages = st
            .domains
            .get(&domid)
            .and_then(|d| d.ram.as_ref())
            .map_or(0, MemFile::pages);
        if pages == 0 {
            return Err((0, libc::ESRCH));
        }
        match gfns.iter().position(|g| *g >= pages) {
            Some(i) => Err((i, libc::EFAULT)),
            None => Ok(()),
        }
    }

    /// Writes byte 0 at `offset` of a granted page that `mapper` has mapped writable (the
    /// kernel's UNMAP_NOTIFY_CLEAR_BYTE).
    pub fn clear_granted_byte(&self, granter: DomId, frame: Gfn, offset: usize) {
        let st = self.lock();
        if let Some(ram) = st.domains.get(&granter).and_then(|d| d.ram.as_ref()) {
            if offset < PAGE_SIZE {
                let _ =
                    ram.mem()
                        .store_u8(frame as usize * PAGE_SIZE + offset, 0, Ordering::SeqCst);
            }
        }
    }

    /// A new file descriptor for a domain's RAM (to pass to a client process).
    pub fn dup_ram_fd(&self, domid: DomId) -> Result<(std::os::fd::OwnedFd, u64), HostError> {
        self.with_ram(domid, |ram| {
            ram.fd().try_clone_to_owned().map(|fd| (fd, ram.pages()))
        })?
        .map_err(HostError::Io)
    }

    /// Whether a domain exists.
    pub fn has_domain(&self, domid: DomId) -> bool {
        self.lock().domains.contains_key(&domid)
    }
}

/// The local side of a grant copy.
#[derive(Debug)]
pub enum CopyBuf<'a> {
    /// From the granted page into this buffer.
    FromGuest(&'a mut [u8]),
    /// From this buffer into the granted page.
    ToGuest(&'a [u8]),
}

/// One segment of [`Host::grant_copy_pinned`].
#[derive(Debug, Clone, Copy)]
pub struct CopyPin {
    /// Granting domain.
    pub granter: DomId,
    /// Grant reference.
    pub gref: GrantRef,
    /// Offset in the granted page.
    pub offset: u16,
    /// Bytes to copy.
    pub len: usize,
    /// Direction: into the granted page (the grant must be writable).
    pub to_guest: bool,
    /// GNTST_* status, set by the host.
    pub status: i16,
    /// Where the bytes are in the granter's RAM (valid when `status` is GNTST_okay).
    pub ram_offset: usize,
}

impl CopyPin {
    /// A segment not yet checked.
    pub fn new(granter: DomId, gref: GrantRef, offset: u16, len: usize, to_guest: bool) -> Self {
        CopyPin {
            granter,
            gref,
            offset,
            len,
            to_guest,
            status: GNTST_GENERAL_ERROR,
            ram_offset: 0,
        }
    }
}

/// The granters' RAM during [`Host::grant_copy_pinned`].
pub struct RamView<'a> {
    st: &'a State,
}

impl RamView<'_> {
    /// The host's mapping of a domain's RAM.
    pub fn mem(&self, domid: DomId) -> Option<&SharedMem> {
        self.st
            .domains
            .get(&domid)
            .and_then(|d| d.ram.as_ref())
            .map(MemFile::mem)
    }
}

impl CopyBuf<'_> {
    fn len(&self) -> usize {
        match self {
            CopyBuf::FromGuest(b) => b.len(),
            CopyBuf::ToGuest(b) => b.len(),
        }
    }
}

//! Server state: the tree, connections with their watches and transactions, domains,
//! and request dispatch.

use std::collections::{BTreeMap, HashMap};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use xen::abi::xs_wire::{msg, XENSTORE_PAYLOAD_MAX, XENSTORE_REL_PATH_MAX};
use xenbus::wire::{split_nul, Message, Perm, PermKind};

use super::conn::Outbox;
use super::error::XsError;
use super::ops::{self, Limits};
use super::path::{canonicalize, domain_path, is_child, is_valid_nodename, node_path};
use super::store::{
    perm_for, Direct, InTx, PendingEvent, Store, Tree, Tx, Who, P_OWNER, P_READ, P_WRITE,
};
use super::Quotas;

/// `@introduceDomain`.
pub const INTRODUCE_DOMAIN: &str = "@introduceDomain";
/// `@releaseDomain`.
pub const RELEASE_DOMAIN: &str = "@releaseDomain";

#[derive(Debug)]
struct Watch {
    /// Canonical path (or `@...`).
    node: String,
    token: Vec<u8>,
    /// Domain home to strip from event paths when the watch was registered relative.
    relative: Option<String>,
}

impl Watch {
    fn shown(&self, path: &str) -> String {
        if let Some(prefix) = &self.relative {
            if let Some(rest) = path.strip_prefix(prefix.as_str()) {
                if let Some(rest) = rest.strip_prefix('/') {
                    return rest.to_owned();
                }
            }
        }
        path.to_owned()
    }
}

pub(crate) struct ConnState {
    domid: u32,
    watches: Vec<Watch>,
    txs: BTreeMap<u32, Tx>,
    next_tx: u32,
    out: Arc<Outbox>,
    stream: UnixStream,
}

#[derive(Debug, Default)]
struct Domain {
    target: Option<u32>,
}

pub(crate) struct State {
    pub quotas: Quotas,
    tree: Tree,
    conns: BTreeMap<u64, ConnState>,
    next_conn: u64,
    domains: BTreeMap<u32, Domain>,
    special_perms: HashMap<&'static str, Vec<Perm>>,
}

/// What a request produced besides its reply.
#[derive(Default)]
struct Effects {
    events: Vec<PendingEvent>,
    /// Events for the requesting connection only (a new watch's first firing).
    own: Vec<Vec<u8>>,
}

/// `onearg()`: exactly one NUL, at the end.
fn onearg(p: &[u8]) -> Result<&[u8], XsError> {
    match p.split_last() {
        Some((0, body)) if !body.contains(&0) => Ok(body),
        _ => Err(XsError::Inval),
    }
}

/// `get_strings()`: the first `n` NUL-terminated strings; fewer is an error.
fn strings(p: &[u8], n: usize) -> Result<Vec<&[u8]>, XsError> {
    let mut v = Vec::with_capacity(n);
    let mut rest = p;
    while v.len() < n {
        let i = rest.iter().position(|b| *b == 0).ok_or(XsError::Inval)?;
        v.push(&rest[..i]);
        rest = &rest[i + 1..];
    }
    Ok(v)
}

fn parse_domid(s: &[u8]) -> Result<u32, XsError> {
    let s = std::str::from_utf8(s).map_err(|_| XsError::Inval)?;
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(XsError::Inval);
    }
    let d: u32 = s.parse().map_err(|_| XsError::Inval)?;
    if d > 0xffff {
        return Err(XsError::Inval);
    }
    Ok(d)
}

/// `atoi()` on an offset: leading digits, anything else stops; a minus sign gives a value
/// past any list.
fn parse_offset(s: &[u8]) -> usize {
    if s.first() == Some(&b'-') {
        return usize::MAX;
    }
    let mut v: usize = 0;
    for b in s.iter().take_while(|b| b.is_ascii_digit()) {
        v = v.saturating_mul(10).saturating_add(usize::from(b - b'0'));
    }
    v
}

fn ok() -> Vec<u8> {
    b"OK\0".to_vec()
}

fn perms_payload(perms: &[Perm]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in perms {
        v.extend_from_slice(p.to_wire().as_bytes());
        v.push(0);
    }
    v
}

impl State {
    pub fn new(quotas: Quotas) -> Self {
        let dom0_only = vec![Perm {
            kind: PermKind::None,
            domid: 0,
        }];
        let mut special_perms = HashMap::new();
        special_perms.insert(INTRODUCE_DOMAIN, dom0_only.clone());
        special_perms.insert(RELEASE_DOMAIN, dom0_only);
        State {
            quotas,
            tree: Tree::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            domains: BTreeMap::new(),
            special_perms,
        }
    }

    pub fn who(&self, domid: u32) -> Who {
        Who {
            domid,
            privileged: domid == 0,
            target: self.domains.get(&domid).and_then(|d| d.target),
        }
    }

    pub fn add_conn(&mut self, domid: u32, out: Arc<Outbox>, stream: UnixStream) -> u64 {
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            ConnState {
                domid,
                watches: Vec::new(),
                txs: BTreeMap::new(),
                next_tx: 1,
                out,
                stream,
            },
        );
        id
    }

    /// Forgets a connection: its watches and transactions go with it.
    pub fn remove_conn(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            c.out.close();
            let _ = c.stream.shutdown(Shutdown::Both);
        }
    }

    /// Closes every connection (their watches and transactions go with them).
    pub fn remove_all_conns(&mut self) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.remove_conn(id);
        }
    }

    pub fn conn_domid(&self, id: u64) -> Option<u32> {
        self.conns.get(&id).map(|c| c.domid)
    }

    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    pub fn dropped_events(&self, domid: u32) -> u64 {
        self.conns
            .values()
            .filter(|c| c.domid == domid)
            .map(|c| c.out.dropped_events())
            .sum()
    }

    pub fn queued(&self, domid: u32) -> (usize, usize, usize) {
        self.conns
            .values()
            .filter(|c| c.domid == domid)
            .map(|c| c.out.queued())
            .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2))
    }

    pub fn is_introduced(&self, domid: u32) -> bool {
        domid == 0 || self.domains.contains_key(&domid)
    }

    pub fn node_count(&self, domid: u32) -> usize {
        self.tree.count(domid).max(0) as usize
    }

    pub fn total_nodes(&self) -> usize {
        self.tree.len()
    }

    fn watch_count(&self, domid: u32) -> usize {
        self.conns
            .values()
            .filter(|c| c.domid == domid)
            .map(|c| c.watches.len())
            .sum()
    }

    // ---- domains ----

    pub fn introduce(&mut self, domid: u32) -> Result<(), XsError> {
        if domid == 0 || domid > 0xffff {
            return Err(XsError::Inval);
        }
        if self.domains.contains_key(&domid) {
            return Ok(());
        }
        self.domains.insert(domid, Domain::default());
        self.fire_all(vec![special_event(INTRODUCE_DOMAIN)]);
        Ok(())
    }

    pub fn release(&mut self, domid: u32) -> Result<(), XsError> {
        if domid == 0 {
            return Err(XsError::Inval);
        }
        if self.domains.remove(&domid).is_none() {
            return Err(XsError::NoEnt);
        }
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.domid == domid)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.remove_conn(id);
        }
        for d in self.domains.values_mut() {
            if d.target == Some(domid) {
                d.target = None;
            }
        }
        self.tree.scrub_domain(domid);
        for perms in self.special_perms.values_mut() {
            if perms.len() > 1 {
                let first = perms[0];
                perms.retain(|p| p.domid != domid);
                if perms.first() != Some(&first) {
                    perms.insert(0, first);
                }
            }
        }
        self.fire_all(vec![special_event(RELEASE_DOMAIN)]);
        Ok(())
    }

    pub fn set_target(&mut self, domid: u32, target: u32) -> Result<(), XsError> {
        if !self.domains.contains_key(&target) {
            return Err(XsError::NoEnt);
        }
        let d = self.domains.get_mut(&domid).ok_or(XsError::NoEnt)?;
        d.target = Some(target);
        Ok(())
    }

    // ---- in-process access ----

    /// Runs a node operation as `domid` outside any transaction and fires its watches.
    pub fn direct<T>(
        &mut self,
        domid: u32,
        f: impl FnOnce(&mut dyn Store, &Who, &Limits<'_>) -> Result<T, XsError>,
    ) -> Result<T, XsError> {
        let who = self.who(domid);
        let mut events = Vec::new();
        let quotas = self.quotas.clone();
        let lim = Limits { quotas: &quotas };
        let r = {
            let mut s = Direct {
                tree: &mut self.tree,
                events: &mut events,
            };
            f(&mut s, &who, &lim)
        };
        self.fire_all(events);
        r
    }

    pub fn path(&self, domid: u32, raw: &str) -> Result<String, XsError> {
        node_path(domid, raw.as_bytes(), self.quotas.path_max)
    }

    // ---- watches ----

    fn fire_all(&self, events: Vec<PendingEvent>) {
        for ev in &events {
            self.fire(ev);
        }
    }

    /// Delivers one change to every watch it matches and whose owner may see it
    /// (XSA-115): it must be able to read the node or its parent; special events need
    /// read access to the special node.
    fn fire(&self, ev: &PendingEvent) {
        for c in self.conns.values() {
            let who = self.who(c.domid);
            let visible = if ev.special {
                self.special_perms
                    .get(ev.path.as_str())
                    .is_some_and(|p| perm_for(&who, p) & P_READ != 0)
            } else {
                perm_for(&who, &ev.perms) & P_READ != 0
                    || ev
                        .old_perms
                        .as_ref()
                        .is_some_and(|p| perm_for(&who, p) & P_READ != 0)
                    || ev
                        .parent_perms
                        .as_ref()
                        .is_some_and(|p| perm_for(&who, p) & P_READ != 0)
            };
            if !visible {
                continue;
            }
            for w in &c.watches {
                let hit = if ev.special || ev.exact {
                    w.node == ev.path
                } else {
                    is_child(&ev.path, &w.node)
                };
                if hit {
                    if let Some(p) = event_payload(&w.shown(&ev.path), &w.token) {
                        c.out.push_event(p);
                    }
                }
            }
        }
    }

    // ---- requests ----

    /// Handles one request of connection `id`: queues the reply, then the events.
    /// Returns false if the connection is gone.
    pub fn process(&mut self, id: u64, m: &Message) -> bool {
        let Some(out) = self.conns.get(&id).map(|c| c.out.clone()) else {
            return false;
        };
        let mut fx = Effects::default();
        let (ty, mut payload) = match self.dispatch(id, m, &mut fx) {
            Ok(r) => r,
            Err(e) => (msg::XS_ERROR, err_payload(e)),
        };
        let mut ty = ty;
        if ty == msg::XS_ERROR {
            tracing::debug!(
                type_ = xenbus::wire::type_name(m.type_),
                req_id = m.req_id,
                error = %String::from_utf8_lossy(&payload),
                "request refused"
            );
        }
        if payload.len() > XENSTORE_PAYLOAD_MAX {
            // XSA-72: never send an oversized reply.
            ty = msg::XS_ERROR;
            payload = err_payload(XsError::TooBig);
        }
        out.push_reply(&Message {
            type_: ty,
            req_id: m.req_id,
            tx_id: m.tx_id,
            payload,
        });
        for p in fx.own {
            out.push_event(p);
        }
        self.fire_all(fx.events);
        self.conns.contains_key(&id)
    }

    fn dispatch(
        &mut self,
        id: u64,
        m: &Message,
        fx: &mut Effects,
    ) -> Result<(u32, Vec<u8>), XsError> {
        let domid = self.conns.get(&id).map(|c| c.domid).ok_or(XsError::Inval)?;
        let who = self.who(domid);
        let p = &m.payload;
        let t = m.type_;
        let privileged_only = matches!(
            t,
            msg::XS_CONTROL
                | msg::XS_INTRODUCE
                | msg::XS_RELEASE
                | msg::XS_SET_TARGET
                | msg::XS_RESUME
        );
        if privileged_only && !who.privileged {
            return Err(XsError::Acces);
        }
        let reply = match t {
            msg::XS_READ
            | msg::XS_WRITE
            | msg::XS_MKDIR
            | msg::XS_RM
            | msg::XS_DIRECTORY
            | msg::XS_DIRECTORY_PART
            | msg::XS_GET_PERMS
            | msg::XS_SET_PERMS => {
                return self.node_request(id, &who, m, fx).map(|v| (t, v));
            }
            msg::XS_WATCH => self.do_watch(id, &who, p, fx)?,
            msg::XS_UNWATCH => self.do_unwatch(id, &who, p)?,
            msg::XS_TRANSACTION_START => self.do_transaction_start(id, &who, m)?,
            msg::XS_TRANSACTION_END => self.do_transaction_end(id, &who, m, fx)?,
            msg::XS_GET_DOMAIN_PATH => {
                let d = parse_domid(onearg(p)?)?;
                let mut v = domain_path(d).into_bytes();
                v.push(0);
                v
            }
            msg::XS_IS_DOMAIN_INTRODUCED => {
                let d = parse_domid(onearg(p)?)?;
                if self.is_introduced(d) {
                    b"T\0".to_vec()
                } else {
                    b"F\0".to_vec()
                }
            }
            msg::XS_INTRODUCE => {
                let v = strings(p, 3)?;
                let d = parse_domid(v[0])?;
                let port = std::str::from_utf8(v[2])
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .ok_or(XsError::Inval)?;
                if port <= 0 {
                    return Err(XsError::Inval);
                }
                self.introduce(d)?;
                ok()
            }
            msg::XS_RELEASE => {
                let d = parse_domid(onearg(p)?)?;
                self.release(d)?;
                ok()
            }
            msg::XS_RESUME => {
                let d = parse_domid(onearg(p)?)?;
                if !self.domains.contains_key(&d) {
                    return Err(XsError::NoEnt);
                }
                ok()
            }
            msg::XS_SET_TARGET => {
                let v = strings(p, 2)?;
                let d = parse_domid(v[0])?;
                let tgt = parse_domid(v[1])?;
                self.set_target(d, tgt)?;
                ok()
            }
            msg::XS_RESET_WATCHES => {
                // XSA-484: refused inside a transaction instead of tearing it down.
                if m.tx_id != 0 {
                    return Err(XsError::Inval);
                }
                if let Some(c) = self.conns.get_mut(&id) {
                    c.watches.clear();
                    c.txs.clear();
                }
                ok()
            }
            msg::XS_CONTROL => {
                let v = split_nul(p);
                match v.first().copied() {
                    Some(b"print") => {
                        let text = v.get(1).map(|s| String::from_utf8_lossy(s).into_owned());
                        tracing::info!(
                            text = text.as_deref().unwrap_or(""),
                            "xenstore control print"
                        );
                        ok()
                    }
                    Some(b"log") => ok(),
                    _ => return Err(XsError::Inval),
                }
            }
            _ => return Err(XsError::Inval),
        };
        Ok((t, reply))
    }

    fn do_watch(
        &mut self,
        id: u64,
        who: &Who,
        p: &[u8],
        fx: &mut Effects,
    ) -> Result<Vec<u8>, XsError> {
        let v = strings(p, 2)?;
        let raw = std::str::from_utf8(v[0]).map_err(|_| XsError::Inval)?;
        let (node, relative) = if raw.starts_with('@') {
            if raw.len() > XENSTORE_REL_PATH_MAX {
                return Err(XsError::Inval);
            }
            (raw.to_owned(), None)
        } else {
            let node = canonicalize(who.domid, raw);
            if !is_valid_nodename(&node, self.quotas.path_max) {
                return Err(XsError::Inval);
            }
            let rel = (!raw.starts_with('/')).then(|| domain_path(who.domid));
            (node, rel)
        };
        let token = v[1].to_vec();
        let c = self.conns.get(&id).ok_or(XsError::Inval)?;
        if c.watches.iter().any(|w| w.node == node && w.token == token) {
            return Err(XsError::Exist);
        }
        // cxenstored checks `count > quota` before adding, dom0 exempt.
        if !who.privileged && self.watch_count(who.domid) > self.quotas.watches_per_domain {
            return Err(XsError::TooBig);
        }
        let w = Watch {
            node,
            token,
            relative,
        };
        // The first firing: path as registered, no permission check.
        if let Some(ev) = event_payload(&w.shown(&w.node), &w.token) {
            fx.own.push(ev);
        }
        if let Some(c) = self.conns.get_mut(&id) {
            c.watches.push(w);
        }
        Ok(ok())
    }

    fn do_unwatch(&mut self, id: u64, who: &Who, p: &[u8]) -> Result<Vec<u8>, XsError> {
        let v = strings(p, 2)?;
        let raw = std::str::from_utf8(v[0]).map_err(|_| XsError::Inval)?;
        let node = canonicalize(who.domid, raw);
        let c = self.conns.get_mut(&id).ok_or(XsError::Inval)?;
        let pos = c
            .watches
            .iter()
            .position(|w| w.node == node && w.token == v[1])
            .ok_or(XsError::NoEnt)?;
        c.watches.remove(pos);
        Ok(ok())
    }

    fn do_transaction_start(
        &mut self,
        id: u64,
        who: &Who,
        m: &Message,
    ) -> Result<Vec<u8>, XsError> {
        let c = self.conns.get_mut(&id).ok_or(XsError::Inval)?;
        if m.tx_id != 0 {
            return Err(if c.txs.contains_key(&m.tx_id) {
                XsError::Busy
            } else {
                XsError::NoEnt
            });
        }
        // cxenstored: `conn->id && transaction_started > quota` (so quota + 1 fit).
        if !who.privileged && c.txs.len() > self.quotas.transactions_per_conn {
            return Err(XsError::NoSpc);
        }
        let mut tid = c.next_tx;
        while tid == 0 || c.txs.contains_key(&tid) {
            tid = tid.wrapping_add(1);
        }
        c.next_tx = tid.wrapping_add(1);
        c.txs.insert(tid, Tx::default());
        Ok(format!("{tid}\0").into_bytes())
    }

    fn do_transaction_end(
        &mut self,
        id: u64,
        who: &Who,
        m: &Message,
        fx: &mut Effects,
    ) -> Result<Vec<u8>, XsError> {
        let arg = onearg(&m.payload)?;
        let commit = match arg {
            b"T" => true,
            b"F" => false,
            _ => return Err(XsError::Inval),
        };
        if m.tx_id == 0 {
            return Err(XsError::NoEnt);
        }
        let c = self.conns.get_mut(&id).ok_or(XsError::Inval)?;
        let tx = c.txs.remove(&m.tx_id).ok_or(XsError::NoEnt)?;
        if !commit {
            return Ok(ok());
        }
        if tx.fail {
            return Err(XsError::NoMem);
        }
        // transaction_fix_domains(): every domain whose node count the transaction
        // changes must stay below the quota (`count >= quota` fails, so a transaction
        // can only take a domain to quota - 1). Checked for unprivileged callers only.
        if !who.privileged {
            let quota = self.quotas.nodes_per_domain as i64;
            for (d, delta) in tx.deltas() {
                if delta != 0 && self.tree.count(d) + delta >= quota {
                    return Err(XsError::NoSpc);
                }
            }
        }
        let events = tx.commit(&mut self.tree)?;
        fx.events.extend(events);
        Ok(ok())
    }

    fn node_request(
        &mut self,
        id: u64,
        who: &Who,
        m: &Message,
        fx: &mut Effects,
    ) -> Result<Vec<u8>, XsError> {
        let quotas = self.quotas.clone();
        let lim = Limits { quotas: &quotas };
        let p = &m.payload;
        let t = m.type_;
        // Parse first: errors in the request do not touch the transaction.
        let (path_raw, rest): (&[u8], Option<Vec<&[u8]>>) = match t {
            msg::XS_WRITE => {
                let v = strings(p, 1)?;
                (v[0], Some(vec![&p[v[0].len() + 1..]]))
            }
            msg::XS_DIRECTORY_PART => {
                let v = strings(p, 2)?;
                (v[0], Some(vec![v[1]]))
            }
            msg::XS_SET_PERMS => {
                let v = split_nul(p);
                if p.last() != Some(&0) || v.len() < 2 {
                    return Err(XsError::Inval);
                }
                (v[0], Some(v[1..].to_vec()))
            }
            _ => (onearg(p)?, None),
        };
        let raw = std::str::from_utf8(path_raw).map_err(|_| XsError::Inval)?;
        if raw.starts_with('@') && matches!(t, msg::XS_GET_PERMS | msg::XS_SET_PERMS) {
            return self.special_perms_request(who, &lim, raw, t, rest);
        }
        let path = node_path(who.domid, path_raw, quotas.path_max)?;
        let perms = match (t, &rest) {
            (msg::XS_SET_PERMS, Some(v)) => {
                Some(Perm::parse_list(v.iter().copied()).map_err(|_| XsError::Inval)?)
            }
            _ => None,
        };

        let run = |s: &mut dyn Store| -> Result<Vec<u8>, XsError> {
            match t {
                msg::XS_READ => ops::read(s, who, &path),
                msg::XS_WRITE => {
                    let value = rest
                        .as_ref()
                        .and_then(|v| v.first())
                        .map_or(Vec::new(), |v| v.to_vec());
                    ops::write(s, who, &lim, &path, value).map(|()| ok())
                }
                msg::XS_MKDIR => ops::mkdir(s, who, &lim, &path).map(|()| ok()),
                msg::XS_RM => ops::rm(s, who, &path).map(|()| ok()),
                msg::XS_DIRECTORY => Ok(ops::directory(s, who, &path)?.children_blob()),
                msg::XS_DIRECTORY_PART => {
                    let off = rest
                        .as_ref()
                        .and_then(|v| v.first())
                        .map_or(0, |o| parse_offset(o));
                    let n = ops::directory(s, who, &path)?;
                    Ok(directory_part(n.gen, &n.children_blob(), off))
                }
                msg::XS_GET_PERMS => Ok(perms_payload(&ops::get_perms(s, who, &path)?)),
                msg::XS_SET_PERMS => {
                    let perms = perms.clone().ok_or(XsError::Inval)?;
                    ops::set_perms(s, who, &lim, &path, perms).map(|()| ok())
                }
                _ => Err(XsError::Inval),
            }
        };

        if m.tx_id == 0 {
            let mut s = Direct {
                tree: &mut self.tree,
                events: &mut fx.events,
            };
            return run(&mut s);
        }
        let c = self.conns.get_mut(&id).ok_or(XsError::Inval)?;
        let mut tx = c.txs.remove(&m.tx_id).ok_or(XsError::NoEnt)?;
        let r = {
            let mut s = InTx {
                tree: &mut self.tree,
                tx: &mut tx,
                node_limit: (!who.privileged).then_some(quotas.nodes_per_transaction),
            };
            run(&mut s)
        };
        if let Some(c) = self.conns.get_mut(&id) {
            c.txs.insert(m.tx_id, tx);
        }
        r
    }

    fn special_perms_request(
        &mut self,
        who: &Who,
        lim: &Limits<'_>,
        name: &str,
        t: u32,
        rest: Option<Vec<&[u8]>>,
    ) -> Result<Vec<u8>, XsError> {
        let key = match name {
            INTRODUCE_DOMAIN => INTRODUCE_DOMAIN,
            RELEASE_DOMAIN => RELEASE_DOMAIN,
            _ => return Err(XsError::NoEnt),
        };
        let cur = self.special_perms.get(key).cloned().unwrap_or_default();
        if t == msg::XS_GET_PERMS {
            if perm_for(who, &cur) & P_READ == 0 {
                return Err(XsError::Acces);
            }
            return Ok(perms_payload(&cur));
        }
        let v = rest.ok_or(XsError::Inval)?;
        let perms = Perm::parse_list(v.iter().copied()).map_err(|_| XsError::Inval)?;
        ops::check_perm_list(who, lim, &perms)?;
        if perm_for(who, &cur) & (P_WRITE | P_OWNER) != (P_WRITE | P_OWNER) {
            return Err(XsError::Acces);
        }
        self.special_perms.insert(key, perms);
        Ok(ok())
    }
}

fn special_event(name: &str) -> PendingEvent {
    PendingEvent {
        path: name.to_owned(),
        exact: true,
        special: true,
        perms: Vec::new(),
        old_perms: None,
        parent_perms: None,
    }
}

fn err_payload(e: XsError) -> Vec<u8> {
    let mut v = e.name().as_bytes().to_vec();
    v.push(0);
    v
}

/// `path\0token\0`, or None if it would exceed the payload limit (XSA-324: such events
/// are dropped).
fn event_payload(path: &str, token: &[u8]) -> Option<Vec<u8>> {
    let len = path.len() + 1 + token.len() + 1;
    if len > XENSTORE_PAYLOAD_MAX {
        return None;
    }
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(path.as_bytes());
    v.push(0);
    v.extend_from_slice(token);
    v.push(0);
    Some(v)
}

/// `do_directory_part()`: `<generation>\0` then as many whole NUL-terminated child names
/// from byte offset `off` as fit, and a final empty string once the list is complete.
fn directory_part(gen: u64, children: &[u8], off: usize) -> Vec<u8> {
    let mut out = format!("{gen}\0").into_bytes();
    if off >= children.len() {
        out.push(0);
        return out;
    }
    let max = XENSTORE_PAYLOAD_MAX - out.len() - 1;
    let rest = &children[off..];
    let mut len = 0;
    while len < rest.len() {
        let end = rest[len..]
            .iter()
            .position(|b| *b == 0)
            .map_or(rest.len(), |i| len + i + 1);
        if end > max {
            break;
        }
        len = end;
    }
    out.extend_from_slice(&rest[..len]);
    if len == rest.len() {
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_directory_part_offset_past_end_is_generation_and_empty_string() {
        assert_eq!(directory_part(7, b"a\0b\0", 4), b"7\0\0");
        assert_eq!(directory_part(7, b"", 0), b"7\0\0");
    }

    #[test]
    fn test_directory_part_whole_list_is_terminated() {
        assert_eq!(directory_part(3, b"a\0bc\0", 0), b"3\0a\0bc\0\0");
        // An offset inside a name returns the rest of it, as cxenstored's byte offsets.
        assert_eq!(directory_part(3, b"a\0bc\0", 3), b"3\0c\0\0");
    }

    #[test]
    fn test_directory_part_splits_at_whole_names_under_payload_max() {
        let name = [b'x'; 99];
        let mut blob = Vec::new();
        for _ in 0..60 {
            blob.extend_from_slice(&name);
            blob.push(0);
        }
        let first = directory_part(1, &blob, 0);
        assert!(first.len() <= XENSTORE_PAYLOAD_MAX);
        let body = &first[2..];
        assert_eq!(body.len() % 100, 0, "whole names only, no terminator");
        let next = directory_part(1, &blob, body.len());
        assert!(next.ends_with(b"\0\0"));
        assert_eq!(body.len() + next.len() - 3, blob.len());
    }

    #[test]
    fn test_request_argument_parsers() {
        assert_eq!(onearg(b"/a\0"), Ok(&b"/a"[..]));
        assert_eq!(onearg(b"/a"), Err(XsError::Inval));
        assert_eq!(onearg(b"/a\0b\0"), Err(XsError::Inval));
        assert_eq!(onearg(b""), Err(XsError::Inval));
        assert_eq!(strings(b"a\0b\0c", 2).unwrap(), [&b"a"[..], b"b"]);
        assert_eq!(strings(b"a\0b", 2), Err(XsError::Inval));
        assert_eq!(parse_domid(b"65535"), Ok(65535));
        assert_eq!(parse_domid(b"65536"), Err(XsError::Inval));
        assert_eq!(parse_domid(b"-1"), Err(XsError::Inval));
        assert_eq!(parse_offset(b"12abc"), 12);
        assert_eq!(parse_offset(b"-3"), usize::MAX);
        assert_eq!(parse_offset(b"99999999999999999999999"), usize::MAX);
    }

    #[test]
    fn test_event_payload_over_limit_is_none() {
        assert!(event_payload("/a", &[b't'; 4092]).is_some());
        assert!(event_payload("/a", &[b't'; 4093]).is_none());
    }
}

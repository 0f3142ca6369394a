//! The node database, the permission rule, and the transaction overlay.

use std::collections::HashMap;

use xenbus::wire::{Perm, PermKind};

use super::error::XsError;

/// Access bits (`XS_PERM_READ`, `XS_PERM_WRITE`, `XS_PERM_OWNER`).
pub(crate) const P_READ: u8 = 1;
pub(crate) const P_WRITE: u8 = 2;
pub(crate) const P_OWNER: u8 = 4;

/// Who performs an access.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Who {
    pub domid: u32,
    pub privileged: bool,
    /// The domain this one was made a device model for (SET_TARGET).
    pub target: Option<u32>,
}

fn kind_bits(k: PermKind) -> u8 {
    match k {
        PermKind::None => 0,
        PermKind::Read => P_READ,
        PermKind::Write => P_WRITE,
        PermKind::Both => P_READ | P_WRITE,
    }
}

/// `perm_for_conn()`: the privileged domain and the owner (or a domain whose target is the
/// owner) get everything; otherwise the first matching exception, else the default.
pub(crate) fn perm_for(who: &Who, perms: &[Perm]) -> u8 {
    let all = P_READ | P_WRITE | P_OWNER;
    if who.privileged {
        return all;
    }
    let Some(first) = perms.first() else {
        return 0;
    };
    let is_me = |d: u32| d == who.domid || who.target == Some(d);
    if is_me(first.domid) {
        return all;
    }
    for p in &perms[1..] {
        if is_me(p.domid) {
            return kind_bits(p.kind);
        }
    }
    kind_bits(first.kind)
}

/// One node.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub value: Vec<u8>,
    pub perms: Vec<Perm>,
    /// Child names, in creation order.
    pub children: Vec<String>,
    /// Generation of the last change.
    pub gen: u64,
}

impl Node {
    pub fn new(value: Vec<u8>, perms: Vec<Perm>) -> Self {
        Node {
            value,
            perms,
            children: Vec::new(),
            gen: 0,
        }
    }

    /// Bytes of the NUL-terminated child names.
    pub fn children_len(&self) -> usize {
        self.children.iter().map(|c| c.len() + 1).sum()
    }

    /// The NUL-terminated child names.
    pub fn children_blob(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.children_len());
        for c in &self.children {
            v.extend_from_slice(c.as_bytes());
            v.push(0);
        }
        v
    }

    /// The size cxenstored 4.17 charges against the entry-size quota: its tdb record
    /// (24-byte header, 8 bytes per permission, data, child names).
    pub fn acc_size(&self) -> usize {
        24 + 8 * self.perms.len() + self.value.len() + self.children_len()
    }

    pub fn owner(&self) -> u32 {
        self.perms.first().map_or(0, |p| p.domid)
    }
}

/// A change that may fire watches, captured when it happened.
#[derive(Debug, Clone)]
pub(crate) struct PendingEvent {
    pub path: String,
    /// Fire only watches on exactly this path (children of a removed subtree).
    pub exact: bool,
    /// `@introduceDomain` / `@releaseDomain`.
    pub special: bool,
    /// Permissions of the node (before removal, for a removal).
    pub perms: Vec<Perm>,
    /// Permissions before the change, for SET_PERMS: whoever could read the node
    /// before hears about it.
    pub old_perms: Option<Vec<Perm>>,
    /// Permissions of its parent at the time.
    pub parent_perms: Option<Vec<Perm>>,
}

/// The committed database.
#[derive(Debug)]
pub(crate) struct Tree {
    nodes: HashMap<String, Node>,
    gen: u64,
    /// Nodes owned per domain.
    counts: HashMap<u32, i64>,
}

impl Tree {
    /// `/`, `/tool` and `/tool/xenstored`, owned by dom0 with no access for others, as
    /// cxenstored's `setup_structure()`.
    pub fn new() -> Self {
        let mut t = Tree {
            nodes: HashMap::new(),
            gen: 1,
            counts: HashMap::new(),
        };
        let perms = vec![Perm {
            kind: PermKind::None,
            domid: 0,
        }];
        let mut root = Node::new(Vec::new(), perms.clone());
        root.children.push("tool".into());
        let mut tool = Node::new(Vec::new(), perms.clone());
        tool.children.push("xenstored".into());
        t.set("/", root);
        t.set("/tool", tool);
        t.set("/tool/xenstored", Node::new(Vec::new(), perms));
        t
    }

    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    pub fn next_gen(&mut self) -> u64 {
        self.gen += 1;
        self.gen
    }

    /// Stores a node with a fresh generation and keeps the per-owner counts.
    pub fn set(&mut self, path: &str, mut node: Node) {
        node.gen = self.next_gen();
        let owner = node.owner();
        if let Some(old) = self.nodes.insert(path.to_owned(), node) {
            *self.counts.entry(old.owner()).or_default() -= 1;
        }
        *self.counts.entry(owner).or_default() += 1;
    }

    pub fn remove(&mut self, path: &str) {
        if let Some(old) = self.nodes.remove(path) {
            *self.counts.entry(old.owner()).or_default() -= 1;
        }
    }

    /// Nodes owned by `domid`.
    pub fn count(&self, domid: u32) -> i64 {
        self.counts.get(&domid).copied().unwrap_or(0)
    }

    /// Forgets a dead domain in every permission list (XSA-322): nodes it owned become
    /// dom0's, its exceptions disappear. Generations are not changed.
    pub fn scrub_domain(&mut self, domid: u32) {
        let mut moved = 0;
        for n in self.nodes.values_mut() {
            if n.perms.first().is_some_and(|p| p.domid == domid) {
                n.perms[0].domid = 0;
                moved += 1;
            }
            if n.perms.len() > 1 {
                let first = n.perms[0];
                let mut rest: Vec<Perm> = n.perms[1..]
                    .iter()
                    .copied()
                    .filter(|p| p.domid != domid)
                    .collect();
                rest.insert(0, first);
                n.perms = rest;
            }
        }
        self.counts.remove(&domid);
        *self.counts.entry(0).or_default() += moved;
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
}

/// The view of the database an operation works on: the committed tree, or a
/// transaction's overlay over it.
pub(crate) trait Store {
    /// Reads a node; inside a transaction this records the access (and may hit the
    /// nodes-per-transaction quota).
    fn get(&mut self, path: &str) -> Result<Option<Node>, XsError>;
    fn put(&mut self, path: &str, node: Node);
    fn remove(&mut self, path: &str);
    /// Nodes owned by `domid`, including this transaction's changes.
    fn count(&self, domid: u32) -> i64;
    fn event(&mut self, ev: PendingEvent);
    /// Marks the transaction failed (a change went wrong part-way); no-op outside one.
    fn fail_transaction(&mut self) -> bool;
}

/// Direct access to the committed tree; events are collected for firing after the
/// request.
pub(crate) struct Direct<'a> {
    pub tree: &'a mut Tree,
    pub events: &'a mut Vec<PendingEvent>,
}

impl Store for Direct<'_> {
    fn get(&mut self, path: &str) -> Result<Option<Node>, XsError> {
        Ok(self.tree.get(path).cloned())
    }
    fn put(&mut self, path: &str, node: Node) {
        self.tree.set(path, node);
    }
    fn remove(&mut self, path: &str) {
        self.tree.remove(path);
    }
    fn count(&self, domid: u32) -> i64 {
        self.tree.count(domid)
    }
    fn event(&mut self, ev: PendingEvent) {
        self.events.push(ev);
    }
    fn fail_transaction(&mut self) -> bool {
        false
    }
}

/// A node as a transaction first saw it, and what it made of it.
#[derive(Debug)]
struct TxEntry {
    /// Generation in the committed tree at first access (`None`: absent).
    gen_at_access: Option<u64>,
    node: Option<Node>,
    modified: bool,
}

/// One open transaction: cxenstored's model. Every node the transaction touches is
/// copied at first access together with its generation; the transaction then works on
/// its copies. Commit fails with EAGAIN if any touched node's committed generation
/// changed since that first access.
#[derive(Debug, Default)]
pub(crate) struct Tx {
    entries: HashMap<String, TxEntry>,
    order: Vec<String>,
    delta: HashMap<u32, i64>,
    events: Vec<PendingEvent>,
    pub fail: bool,
}

impl Tx {
    /// Checks for conflicts, then applies the changes to `tree` and returns the events to
    /// fire (one per changed node, in first-change order).
    pub fn commit(self, tree: &mut Tree) -> Result<Vec<PendingEvent>, XsError> {
        for (path, e) in &self.entries {
            if tree.get(path).map(|n| n.gen) != e.gen_at_access {
                return Err(XsError::Again);
            }
        }
        let mut entries = self.entries;
        for path in &self.order {
            if let Some(e) = entries.remove(path) {
                if e.modified {
                    match e.node {
                        Some(n) => tree.set(path, n),
                        None => tree.remove(path),
                    }
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        Ok(self
            .events
            .into_iter()
            .filter(|e| seen.insert(e.path.clone()))
            .collect())
    }

    /// Per-domain change of owned nodes this transaction would make.
    pub fn deltas(&self) -> impl Iterator<Item = (u32, i64)> + '_ {
        self.delta.iter().map(|(d, n)| (*d, *n))
    }
}

/// A transaction's view.
pub(crate) struct InTx<'a> {
    pub tree: &'a mut Tree,
    pub tx: &'a mut Tx,
    /// Nodes-per-transaction quota (None: exempt).
    pub node_limit: Option<usize>,
}

impl InTx<'_> {
    fn entry(&mut self, path: &str) -> Result<&mut TxEntry, XsError> {
        if !self.tx.entries.contains_key(path) {
            if self.node_limit.is_some_and(|l| self.tx.entries.len() >= l) {
                return Err(XsError::NoSpc);
            }
            let node = self.tree.get(path).cloned();
            self.tx.entries.insert(
                path.to_owned(),
                TxEntry {
                    gen_at_access: node.as_ref().map(|n| n.gen),
                    node,
                    modified: false,
                },
            );
            self.tx.order.push(path.to_owned());
        }
        self.tx.entries.get_mut(path).ok_or(XsError::NoEnt)
    }

    fn account(&mut self, old: Option<u32>, new: Option<u32>) {
        if let Some(o) = old {
            *self.tx.delta.entry(o).or_default() -= 1;
        }
        if let Some(n) = new {
            *self.tx.delta.entry(n).or_default() += 1;
        }
    }
}

impl Store for InTx<'_> {
    fn get(&mut self, path: &str) -> Result<Option<Node>, XsError> {
        Ok(self.entry(path)?.node.clone())
    }
    fn put(&mut self, path: &str, mut node: Node) {
        node.gen = self.tree.next_gen();
        let new_owner = node.owner();
        let old_owner = match self.entry(path) {
            Ok(e) => {
                let old = e.node.as_ref().map(Node::owner);
                e.node = Some(node);
                e.modified = true;
                old
            }
            // Only the quota can refuse a new entry, and every caller read the node first.
            Err(_) => return,
        };
        self.account(old_owner, Some(new_owner));
    }
    fn remove(&mut self, path: &str) {
        let old_owner = match self.entry(path) {
            Ok(e) => {
                let old = e.node.take().map(|n| n.owner());
                e.modified = true;
                old
            }
            Err(_) => return,
        };
        self.account(old_owner, None);
    }
    fn count(&self, domid: u32) -> i64 {
        self.tree.count(domid) + self.tx.delta.get(&domid).copied().unwrap_or(0)
    }
    fn event(&mut self, ev: PendingEvent) {
        self.tx.events.push(ev);
    }
    fn fail_transaction(&mut self) -> bool {
        self.tx.fail = true;
        true
    }
}

//! Node operations (read, write, mkdir, rm, directory, permissions) on a [`Store`], with
//! cxenstored 4.17's permission and quota rules.

use xenbus::wire::Perm;

use super::error::XsError;
use super::path::{basename, child_path, parent};
use super::store::{perm_for, Node, PendingEvent, Store, Who, P_OWNER, P_READ, P_WRITE};
use super::Quotas;

/// The limits an operation needs.
pub(crate) struct Limits<'a> {
    pub quotas: &'a Quotas,
}

/// `errno_from_parents()`: a missing node reports ENOENT only if the nearest existing
/// ancestor grants the access asked for; otherwise EACCES, so that a caller learns
/// nothing about nodes it may not see.
fn errno_from_parents(s: &mut dyn Store, who: &Who, path: &str, err: XsError, perm: u8) -> XsError {
    let mut p = path;
    while p != "/" {
        p = parent(p);
        match s.get(p) {
            Ok(Some(n)) => {
                return if perm_for(who, &n.perms) & perm != 0 {
                    err
                } else {
                    XsError::Acces
                };
            }
            Ok(None) => {}
            Err(e) => return e,
        }
    }
    XsError::Acces
}

/// `get_node()`: the node if it exists and `perm` is granted.
pub(crate) fn get_checked(
    s: &mut dyn Store,
    who: &Who,
    path: &str,
    perm: u8,
) -> Result<Node, XsError> {
    match s.get(path)? {
        Some(n) if perm_for(who, &n.perms) & perm == perm => Ok(n),
        Some(_) => Err(XsError::Acces),
        None => Err(errno_from_parents(s, who, path, XsError::NoEnt, perm)),
    }
}

fn check_size(who: &Who, lim: &Limits<'_>, n: &Node) -> Result<(), XsError> {
    if !who.privileged && n.acc_size() >= lim.quotas.entry_size {
        return Err(XsError::NoSpc);
    }
    Ok(())
}

fn parent_perms(s: &mut dyn Store, path: &str) -> Result<Option<Vec<Perm>>, XsError> {
    if path == "/" {
        return Ok(None);
    }
    Ok(s.get(parent(path))?.map(|n| n.perms))
}

/// `create_node()`: creates `path` and any missing ancestors. New nodes inherit the
/// permissions of their parent; a node created by an unprivileged domain is owned by it.
fn create_node(
    s: &mut dyn Store,
    who: &Who,
    lim: &Limits<'_>,
    path: &str,
    value: Vec<u8>,
) -> Result<(), XsError> {
    // Missing nodes, leaf first.
    let mut missing = vec![path.to_owned()];
    let mut cur = path.to_owned();
    let (ppath, mut pnode) = loop {
        let p = parent(&cur).to_owned();
        match s.get(&p)? {
            Some(n) => break (p, n),
            None if p == "/" => return Err(XsError::NoEnt),
            None => {
                missing.push(p.clone());
                cur = p;
            }
        }
    };
    if !who.privileged {
        let have = s.count(who.domid);
        let allowed = (lim.quotas.nodes_per_domain as i64 - have).max(0) as usize;
        if allowed < missing.len() {
            // cxenstored writes the leaf first and checks the quota before each node:
            // if some but not all could be created, the transaction is left broken.
            if allowed > 0 {
                s.fail_transaction();
            }
            return Err(XsError::NoSpc);
        }
    }
    let mut perms = pnode.perms.clone();
    if perms.is_empty() {
        perms.push(Perm {
            kind: xenbus::wire::PermKind::None,
            domid: 0,
        });
    }
    if !who.privileged {
        perms[0].domid = who.domid;
    }
    // Build top-down.
    let mut new_nodes: Vec<(String, Node)> = Vec::with_capacity(missing.len());
    for (i, p) in missing.iter().enumerate().rev() {
        let v = if i == 0 { value.clone() } else { Vec::new() };
        let mut n = Node::new(v, perms.clone());
        if i > 0 {
            n.children.push(basename(&missing[i - 1]).to_owned());
        }
        check_size(who, lim, &n)?;
        new_nodes.push((p.clone(), n));
    }
    pnode
        .children
        .push(basename(&missing[missing.len() - 1]).to_owned());
    check_size(who, lim, &pnode)?;
    let pperms = pnode.perms.clone();
    s.put(&ppath, pnode);
    let leaf_parent_perms = if missing.len() > 1 {
        Some(perms.clone())
    } else {
        Some(pperms)
    };
    for (p, n) in new_nodes {
        s.put(&p, n);
    }
    s.event(PendingEvent {
        path: path.to_owned(),
        exact: false,
        special: false,
        perms,
        old_perms: None,
        parent_perms: leaf_parent_perms,
    });
    Ok(())
}

pub(crate) fn read(s: &mut dyn Store, who: &Who, path: &str) -> Result<Vec<u8>, XsError> {
    Ok(get_checked(s, who, path, P_READ)?.value)
}

pub(crate) fn write(
    s: &mut dyn Store,
    who: &Who,
    lim: &Limits<'_>,
    path: &str,
    value: Vec<u8>,
) -> Result<(), XsError> {
    match get_checked(s, who, path, P_WRITE) {
        Ok(mut n) => {
            n.value = value;
            check_size(who, lim, &n)?;
            let ev = PendingEvent {
                path: path.to_owned(),
                exact: false,
                special: false,
                perms: n.perms.clone(),
                old_perms: None,
                parent_perms: parent_perms(s, path)?,
            };
            s.put(path, n);
            s.event(ev);
            Ok(())
        }
        Err(XsError::NoEnt) => create_node(s, who, lim, path, value),
        Err(e) => Err(e),
    }
}

pub(crate) fn mkdir(
    s: &mut dyn Store,
    who: &Who,
    lim: &Limits<'_>,
    path: &str,
) -> Result<(), XsError> {
    match get_checked(s, who, path, P_WRITE) {
        Ok(_) => Ok(()),
        Err(XsError::NoEnt) => create_node(s, who, lim, path, Vec::new()),
        Err(e) => Err(e),
    }
}

/// `do_rm()`: removes a subtree (iteratively: no recursion however deep the tree,
/// XSA-418). Children fire watches on exactly their path, the top node fires watches
/// on it and above.
pub(crate) fn rm(s: &mut dyn Store, who: &Who, path: &str) -> Result<(), XsError> {
    let top = match get_checked(s, who, path, P_WRITE) {
        Ok(n) => n,
        Err(XsError::NoEnt) => {
            // Removing a missing node is fine if its parent exists.
            return match s.get(parent(path))? {
                Some(_) => Ok(()),
                None => Err(XsError::NoEnt),
            };
        }
        Err(e) => return Err(e),
    };
    if path == "/" {
        return Err(XsError::Inval);
    }
    let top_parent = parent_perms(s, path)?;
    // Post-order (children before their parent, first child first) without recursion:
    // a pre-order walk that visits children last-to-first, reversed.
    let mut order: Vec<(String, Node)> = Vec::new();
    let mut stack: Vec<(String, Option<Node>)> = vec![(path.to_owned(), Some(top))];
    while let Some((p, n)) = stack.pop() {
        let n = match n {
            Some(n) => n,
            None => match s.get(&p)? {
                Some(n) => n,
                None => continue,
            },
        };
        for c in &n.children {
            stack.push((child_path(&p, c), None));
        }
        order.push((p, n));
    }
    order.reverse();
    let mut perms_of: std::collections::HashMap<String, Vec<Perm>> =
        std::collections::HashMap::with_capacity(order.len());
    for (p, n) in &order {
        perms_of.insert(p.clone(), n.perms.clone());
    }
    for (p, n) in order {
        let is_top = p == path;
        let pp = if is_top {
            top_parent.clone()
        } else {
            perms_of.get(parent(&p)).cloned()
        };
        s.event(PendingEvent {
            path: p.clone(),
            exact: !is_top,
            special: false,
            perms: n.perms,
            old_perms: None,
            parent_perms: pp,
        });
        s.remove(&p);
    }
    if let Some(mut pn) = s.get(parent(path))? {
        let name = basename(path);
        pn.children.retain(|c| c != name);
        s.put(parent(path), pn);
    }
    Ok(())
}

pub(crate) fn directory(s: &mut dyn Store, who: &Who, path: &str) -> Result<Node, XsError> {
    get_checked(s, who, path, P_READ)
}

pub(crate) fn get_perms(s: &mut dyn Store, who: &Who, path: &str) -> Result<Vec<Perm>, XsError> {
    Ok(get_checked(s, who, path, P_READ)?.perms)
}

/// Checks a new permission list against the per-node quota.
pub(crate) fn check_perm_list(who: &Who, lim: &Limits<'_>, perms: &[Perm]) -> Result<(), XsError> {
    if perms.is_empty() {
        return Err(XsError::Inval);
    }
    if !who.privileged && perms.len() > lim.quotas.perms_per_node {
        return Err(XsError::NoSpc);
    }
    Ok(())
}

pub(crate) fn set_perms(
    s: &mut dyn Store,
    who: &Who,
    lim: &Limits<'_>,
    path: &str,
    perms: Vec<Perm>,
) -> Result<(), XsError> {
    check_perm_list(who, lim, &perms)?;
    let mut n = get_checked(s, who, path, P_WRITE | P_OWNER)?;
    // Unprivileged domains may not give a node away (XSA-352 class).
    if !who.privileged && perms[0].domid != n.owner() {
        return Err(XsError::Perm);
    }
    let old = std::mem::replace(&mut n.perms, perms);
    check_size(who, lim, &n)?;
    let ev = PendingEvent {
        path: path.to_owned(),
        exact: false,
        special: false,
        perms: n.perms.clone(),
        old_perms: Some(old),
        parent_perms: parent_perms(s, path)?,
    };
    s.put(path, n);
    s.event(ev);
    Ok(())
}

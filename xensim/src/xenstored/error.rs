//! The errors xenstored answers with (the `XS_ERROR` payloads of docs/misc/xenstore.txt).

use xen::abi::xs_wire;

/// An error as xenstored reports it: one errno from the `xsd_errors[]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum XsError {
    /// `EINVAL`: malformed request, invalid path, unknown operation.
    #[error("EINVAL: invalid argument")]
    Inval,
    /// `EACCES`: the caller's permissions do not allow the access.
    #[error("EACCES: permission denied")]
    Acces,
    /// `EEXIST`: the watch (path, token) is already registered.
    #[error("EEXIST: already exists")]
    Exist,
    /// `ENOENT`: no such node, transaction or domain.
    #[error("ENOENT: no such node, transaction or domain")]
    NoEnt,
    /// `ENOMEM`: a transaction failed part-way and can only be aborted.
    #[error("ENOMEM: transaction failed part-way")]
    NoMem,
    /// `ENOSPC`: a quota (nodes, entry size, permissions, transactions, nodes in a
    /// transaction) is exhausted.
    #[error("ENOSPC: quota exceeded")]
    NoSpc,
    /// `EBUSY`: a transaction was started inside a transaction.
    #[error("EBUSY: nested transaction")]
    Busy,
    /// `EAGAIN`: the transaction conflicts with another change; retry it.
    #[error("EAGAIN: transaction conflict, retry")]
    Again,
    /// `E2BIG`: the reply would exceed the payload limit, or the watch quota is exhausted.
    #[error("E2BIG: too big")]
    TooBig,
    /// `EPERM`: an unprivileged domain tried to change a node's owner.
    #[error("EPERM: operation not permitted")]
    Perm,
}

impl XsError {
    /// The errno value.
    pub fn errno(self) -> i32 {
        match self {
            XsError::Inval => libc::EINVAL,
            XsError::Acces => libc::EACCES,
            XsError::Exist => libc::EEXIST,
            XsError::NoEnt => libc::ENOENT,
            XsError::NoMem => libc::ENOMEM,
            XsError::NoSpc => libc::ENOSPC,
            XsError::Busy => libc::EBUSY,
            XsError::Again => libc::EAGAIN,
            XsError::TooBig => libc::E2BIG,
            XsError::Perm => libc::EPERM,
        }
    }

    /// The name sent in the `XS_ERROR` payload (e.g. `"EACCES"`).
    pub fn name(self) -> &'static str {
        xs_wire::name_of(self.errno())
    }
}

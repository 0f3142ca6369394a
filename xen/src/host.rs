//! The entry point: a Xen host (real or simulated) that opens handles.

use std::fs::File;

use crate::{DeviceModel, EventChannels, ForeignMemory, GrantTables};

/// Errors opening a host or one of its devices.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A device node is missing: not running on Xen, or the module is not loaded.
    #[error("{path} is missing: this is not a Xen dom0, or the {module} driver is not loaded ({source})")]
    NoDevice {
        /// The device path.
        path: String,
        /// The kernel module that provides it.
        module: &'static str,
        /// The open error.
        #[source]
        source: std::io::Error,
    },
    /// Opening or connecting failed for another reason.
    #[error("opening {what} failed: {source}")]
    Open {
        /// What was being opened.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The simulated host refused or is gone.
    #[error("xensim host: {0}")]
    Sim(String),
}

/// How to reach xenstore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XsTransport {
    /// The xenstored unix socket (default `/run/xenstored/socket`, or the given path).
    Socket(Option<String>),
    /// The kernel's `/dev/xen/xenbus` (or `/proc/xen/xenbus`).
    Device,
}

/// A byte stream to xenstored, carrying xs_wire messages.
#[derive(Debug)]
pub struct XsStream {
    /// The connection (a unix socket or the xenbus device; both are plain read/write).
    pub file: File,
    /// Where it goes, for error messages.
    pub describe: String,
}

/// A Xen host. Each `open_*` gives a new handle (like opening the device again), so that each
/// ring thread can own its event-channel handle.
pub trait XenHost: Send + Sync {
    /// A short description ("linux", "sim:/path").
    fn describe(&self) -> String;
    /// The domain this process runs in (0 for dom0).
    fn own_domid(&self) -> crate::DomId;
    /// A new event-channel handle.
    fn open_evtchn(&self) -> Result<Box<dyn EventChannels>, HostError>;
    /// A new grant-table handle.
    fn open_gnttab(&self) -> Result<Box<dyn GrantTables>, HostError>;
    /// A new foreign-memory handle.
    fn open_foreign(&self) -> Result<Box<dyn ForeignMemory>, HostError>;
    /// A new device-model handle.
    fn open_devmodel(&self) -> Result<Box<dyn DeviceModel>, HostError>;
    /// A new connection to xenstored.
    fn open_xenstore(&self, transport: &XsTransport) -> Result<XsStream, HostError>;
}

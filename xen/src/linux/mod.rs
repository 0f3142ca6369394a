//! The Linux implementation of the xen traits, on the `/dev/xen` devices of a dom0 kernel.
//!
//! * [`LinuxEvtchn`] on `/dev/xen/evtchn` (xen-evtchn),
//! * [`LinuxGnttab`] on `/dev/xen/gntdev` (xen-gntdev),
//! * [`LinuxForeign`] and [`LinuxDm`] on `/dev/xen/privcmd` (xen-privcmd),
//! * xenstore through `/run/xenstored/socket` or `/dev/xen/xenbus`.
//!
//! [`LinuxHost`] opens them; every `open_*` opens the device again, so each handle has its own
//! file descriptor (its own bound ports, restrictions and mappings). Every ioctl, mmap and raw
//! pointer is in the private `sys` module; [`uapi`] mirrors the kernel headers.

mod evtchn;
mod gnttab;
mod privcmd;
#[allow(unsafe_code)]
mod sys;
pub mod uapi;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

pub use evtchn::LinuxEvtchn;
pub use gnttab::LinuxGnttab;
pub use privcmd::{LinuxDm, LinuxForeign};

use crate::host::{HostError, XenHost, XsStream, XsTransport};
use crate::{DeviceModel, DomId, EventChannels, ForeignMemory, GrantTables};

/// Where xenstored listens by default.
pub const XENSTORED_SOCKET: &str = "/run/xenstored/socket";
/// The kernel's xenbus device (and its legacy location).
pub const XENBUS_DEVICES: [&str; 2] = ["/dev/xen/xenbus", "/proc/xen/xenbus"];
/// The directory of the Xen device nodes.
pub const XEN_DEV_DIR: &str = "/dev/xen";

/// Opens a Xen device node read/write (close-on-exec), mapping "not there" to
/// [`HostError::NoDevice`] with the module that provides it.
fn open_device(path: &Path, module: &'static str, nonblock: bool) -> Result<File, HostError> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    opts.custom_flags(libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 });
    opts.open(path)
        .map_err(|source| device_error(path, module, source))
}

fn device_error(path: &Path, module: &'static str, source: io::Error) -> HostError {
    match source.raw_os_error() {
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => HostError::NoDevice {
            path: path.display().to_string(),
            module,
            source,
        },
        _ => HostError::Open {
            what: path.display().to_string(),
            source,
        },
    }
}

/// The real Xen host of a Linux dom0.
#[derive(Debug, Clone)]
pub struct LinuxHost {
    dev_dir: PathBuf,
    xenstored_socket: PathBuf,
    xenbus_devices: Vec<PathBuf>,
}

impl Default for LinuxHost {
    fn default() -> Self {
        Self::new()
    }
}

impl LinuxHost {
    /// The standard paths: `/dev/xen/*`, `/run/xenstored/socket`.
    pub fn new() -> Self {
        LinuxHost {
            dev_dir: PathBuf::from(XEN_DEV_DIR),
            xenstored_socket: PathBuf::from(XENSTORED_SOCKET),
            xenbus_devices: XENBUS_DEVICES.iter().map(PathBuf::from).collect(),
        }
    }

    /// Uses `dir` instead of `/dev/xen` for evtchn, gntdev, privcmd and xenbus (tests,
    /// unusual setups). The `/proc/xen/xenbus` fallback is dropped.
    pub fn with_dev_dir(dir: impl Into<PathBuf>) -> Self {
        let dev_dir = dir.into();
        let xenbus_devices = vec![dev_dir.join("xenbus")];
        LinuxHost {
            dev_dir,
            xenstored_socket: PathBuf::from(XENSTORED_SOCKET),
            xenbus_devices,
        }
    }

    /// Uses `path` as the default xenstored socket (when [`XsTransport::Socket`] has none).
    pub fn with_xenstored_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.xenstored_socket = path.into();
        self
    }

    fn dev(&self, name: &str) -> PathBuf {
        self.dev_dir.join(name)
    }

    /// Opens the event-channel device as a concrete [`LinuxEvtchn`].
    pub fn evtchn(&self) -> Result<LinuxEvtchn, HostError> {
        let path = self.dev("evtchn");
        let file = open_device(&path, "xen-evtchn", true)?;
        Ok(LinuxEvtchn::from_file(file, path.display().to_string()))
    }

    /// Opens the grant device as a concrete [`LinuxGnttab`].
    pub fn gnttab(&self) -> Result<LinuxGnttab, HostError> {
        let path = self.dev("gntdev");
        let file = open_device(&path, "xen-gntdev", false)?;
        Ok(LinuxGnttab::from_file(file, path.display().to_string()))
    }

    /// Opens privcmd as a concrete [`LinuxForeign`].
    pub fn foreign(&self) -> Result<LinuxForeign, HostError> {
        let path = self.dev("privcmd");
        let file = open_device(&path, "xen-privcmd", false)?;
        Ok(LinuxForeign::from_file(file, path.display().to_string()))
    }

    /// Opens privcmd as a concrete [`LinuxDm`].
    pub fn devmodel(&self) -> Result<LinuxDm, HostError> {
        let path = self.dev("privcmd");
        let file = open_device(&path, "xen-privcmd", false)?;
        Ok(LinuxDm::from_file(file, path.display().to_string()))
    }

    fn xenstore_socket(&self, path: &Path) -> Result<XsStream, HostError> {
        let stream = UnixStream::connect(path).map_err(|source| HostError::Open {
            what: format!(
                "xenstored socket {} (is xenstored running?)",
                path.display()
            ),
            source,
        })?;
        Ok(XsStream {
            file: File::from(std::os::fd::OwnedFd::from(stream)),
            describe: format!("xenstored socket {}", path.display()),
        })
    }

    fn xenstore_device(&self) -> Result<XsStream, HostError> {
        let mut first_missing = None;
        for path in &self.xenbus_devices {
            match open_device(path, "xenbus (xenbus_dev_frontend)", false) {
                Ok(file) => {
                    return Ok(XsStream {
                        file,
                        describe: format!("xenbus device {}", path.display()),
                    })
                }
                Err(e @ HostError::NoDevice { .. }) => {
                    first_missing.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(first_missing.unwrap_or_else(|| HostError::Open {
            what: "xenbus device".to_string(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        }))
    }
}

impl XenHost for LinuxHost {
    fn describe(&self) -> String {
        format!("linux ({})", self.dev_dir.display())
    }

    fn own_domid(&self) -> DomId {
        0
    }

    fn open_evtchn(&self) -> Result<Box<dyn EventChannels>, HostError> {
        Ok(Box::new(self.evtchn()?))
    }

    fn open_gnttab(&self) -> Result<Box<dyn GrantTables>, HostError> {
        Ok(Box::new(self.gnttab()?))
    }

    fn open_foreign(&self) -> Result<Box<dyn ForeignMemory>, HostError> {
        Ok(Box::new(self.foreign()?))
    }

    fn open_devmodel(&self) -> Result<Box<dyn DeviceModel>, HostError> {
        Ok(Box::new(self.devmodel()?))
    }

    fn open_xenstore(&self, transport: &XsTransport) -> Result<XsStream, HostError> {
        match transport {
            XsTransport::Socket(Some(p)) => self.xenstore_socket(Path::new(p)),
            XsTransport::Socket(None) => self.xenstore_socket(&self.xenstored_socket),
            XsTransport::Device => self.xenstore_device(),
        }
    }
}

#[cfg(test)]
mod tests;

//! The host side of a vif: what connects its tap to the rest of dom0's network.
//!
//! * With a `script` key, the toolstack's hotplug script runs as libxl runs it on Linux
//!   (`libxl_linux.c`): argv `<script> online type_if=vif` (and `offline` on teardown), with
//!   the environment `script`, `XENBUS_TYPE=<backend type>` (`vif`, `qnic`),
//!   `XENBUS_PATH=backend/<type>/<domid>/<devid>` (the device's backend directory),
//!   `XENBUS_BASE_PATH=backend`, `netdev` (the `gatewaydev` key, or empty) and `vif=<tap>`.
//!   Xen's `vif-bridge` then reads `bridge` from `$XENBUS_PATH` itself and writes
//!   `hotplug-status`; `bridge` is also passed in the environment, the fallback vif-bridge
//!   uses when the key is missing. A relative script name is taken from `/etc/xen/scripts`.
//! * With no script and a `bridge` key, the tap is enslaved to the bridge with the
//!   `SIOCBRADDIF` ioctl (what brctl does; no `ip` binary needed) and released with
//!   `SIOCBRDELIF`.
//! * With neither, the tap is left as it is (up), for a toolstack that wires it itself.
//!
//! Offline runs once, on [`HostSide::offline`] or on drop.

use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use super::{interface_exists, sys, uapi, valid_ifname, VifId};

/// Where relative script names are looked up (Xen's XEN_SCRIPT_DIR on Debian).
pub const XEN_SCRIPT_DIR: &str = "/etc/xen/scripts";

/// How long a hotplug script may run (libxl's LIBXL_HOTPLUG_TIMEOUT is 10 s; Debian's
/// vif-bridge can wait on a lock, so we allow more).
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the host side.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// The script could not be started.
    #[error("{vif}: cannot run hotplug script {script} {action} for {tap}: {source}")]
    Spawn {
        /// The device.
        vif: VifId,
        /// The tap.
        tap: String,
        /// The script.
        script: PathBuf,
        /// `online` or `offline`.
        action: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The script failed or timed out.
    #[error("{vif}: hotplug script {script} {action} for {tap} failed ({status}): {stderr}")]
    Script {
        /// The device.
        vif: VifId,
        /// The tap.
        tap: String,
        /// The script.
        script: PathBuf,
        /// `online` or `offline`.
        action: &'static str,
        /// Exit status, or "timed out".
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// A bridge operation failed.
    #[error("{vif}: {op} tap {tap} on bridge {bridge}: {source}")]
    Bridge {
        /// The device.
        vif: VifId,
        /// The tap.
        tap: String,
        /// The bridge.
        bridge: String,
        /// What we did.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// How the tap is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostSetup {
    /// Run the toolstack's hotplug script.
    Script {
        /// The `script` key (absolute, or relative to [`XEN_SCRIPT_DIR`]).
        script: String,
        /// The `bridge` key, if any (passed as `bridge` in the environment).
        bridge: Option<String>,
        /// The `gatewaydev` key, if any (`netdev` in the environment).
        gatewaydev: Option<String>,
    },
    /// Enslave the tap to this bridge.
    Bridge(String),
    /// Leave the tap alone.
    None,
}

impl HostSetup {
    /// What the backend's `script` and `bridge` keys ask for.
    pub fn from_keys(script: Option<&str>, bridge: Option<&str>) -> HostSetup {
        fn nonempty(s: Option<&str>) -> Option<&str> {
            s.map(str::trim).filter(|s| !s.is_empty())
        }
        match (nonempty(script), nonempty(bridge)) {
            (Some(s), b) => HostSetup::Script {
                script: s.to_string(),
                bridge: b.map(str::to_string),
                gatewaydev: None,
            },
            (None, Some(b)) => HostSetup::Bridge(b.to_string()),
            (None, None) => HostSetup::None,
        }
    }
}

/// The xenstore device a hotplug script is run for: `XENBUS_TYPE` and `XENBUS_PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XenbusDevice {
    /// The backend type (`vif`, `qnic`).
    pub backend_type: String,
    /// The backend directory, relative to dom0's home as libxl passes it
    /// (`backend/<type>/<domid>/<devid>`), or absolute.
    pub path: String,
}

impl XenbusDevice {
    /// A `vif` device of `vif`'s domain and devid.
    pub fn vif(vif: VifId) -> XenbusDevice {
        XenbusDevice {
            backend_type: "vif".into(),
            path: format!("backend/vif/{}/{}", vif.domid, vif.devid),
        }
    }

    /// The device whose backend directory is `backend_path` (absolute, as the backend
    /// watcher knows it): the path is made relative to dom0's home, as libxl passes it.
    pub fn at(backend_type: &str, backend_path: &str) -> XenbusDevice {
        let path = backend_path
            .strip_prefix("/local/domain/0/")
            .unwrap_or(backend_path);
        XenbusDevice {
            backend_type: backend_type.to_string(),
            path: path.to_string(),
        }
    }
}

/// A tap connected to the host (offlined on drop).
#[derive(Debug)]
pub struct HostSide {
    vif: VifId,
    tap: String,
    setup: HostSetup,
    xenbus: XenbusDevice,
    online: bool,
}

/// The script path libxl would run for a `script` key.
pub fn script_path(script: &str) -> PathBuf {
    let p = Path::new(script);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        Path::new(XEN_SCRIPT_DIR).join(p)
    }
}

fn tail(s: &[u8]) -> String {
    let t = String::from_utf8_lossy(s);
    let t = t.trim();
    let start = t.char_indices().rev().nth(511).map(|(i, _)| i).unwrap_or(0);
    t[start..].to_string()
}

impl HostSide {
    /// Connects tap `tap` of `vif` as `setup` says (the "online" step), for a `vif`
    /// backend at `backend/vif/<domid>/<devid>`.
    pub fn online(vif: VifId, tap: &str, setup: HostSetup) -> Result<HostSide, HotplugError> {
        Self::online_for(vif, tap, setup, XenbusDevice::vif(vif))
    }

    /// [`HostSide::online`] for the backend device `xenbus` (a script gets its type and
    /// path).
    pub fn online_for(
        vif: VifId,
        tap: &str,
        setup: HostSetup,
        xenbus: XenbusDevice,
    ) -> Result<HostSide, HotplugError> {
        let mut h = HostSide {
            vif,
            tap: tap.to_string(),
            setup,
            xenbus,
            online: false,
        };
        match &h.setup {
            HostSetup::Script { .. } => h.run_script("online")?,
            HostSetup::Bridge(b) => h.bridge_op(b, uapi::SIOCBRADDIF, "add")?,
            HostSetup::None => {}
        }
        h.online = true;
        tracing::info!(vif = %vif, tap, setup = ?h.setup, "vif host side online");
        Ok(h)
    }

    /// The setup in force.
    pub fn setup(&self) -> &HostSetup {
        &self.setup
    }

    /// Disconnects (the "offline" step). Runs at most once.
    pub fn offline(&mut self) -> Result<(), HotplugError> {
        if !std::mem::replace(&mut self.online, false) {
            return Ok(());
        }
        match self.setup.clone() {
            HostSetup::Script { .. } => self.run_script("offline"),
            HostSetup::Bridge(b) => {
                if !interface_exists(&self.tap) || !interface_exists(&b) {
                    // Removing the tap (or the bridge) already released it.
                    return Ok(());
                }
                self.bridge_op(&b, uapi::SIOCBRDELIF, "remove")
            }
            HostSetup::None => Ok(()),
        }
    }

    fn bridge_op(&self, bridge: &str, req: u32, op: &'static str) -> Result<(), HotplugError> {
        let err = |source: io::Error| HotplugError::Bridge {
            vif: self.vif,
            tap: self.tap.clone(),
            bridge: bridge.to_string(),
            op,
            source,
        };
        valid_ifname(bridge)
            .map_err(|why| err(io::Error::new(io::ErrorKind::InvalidInput, why)))?;
        if !interface_exists(bridge) {
            return Err(err(io::Error::new(
                io::ErrorKind::NotFound,
                "no such bridge in this network namespace",
            )));
        }
        let ctl: OwnedFd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| err(e.into()))?;
        let mut r = sys::ifreq(&self.tap);
        sys::ioctl_ifreq(ctl.as_fd(), uapi::SIOCGIFINDEX, &mut r).map_err(err)?;
        let index = sys::ifreq_int(&r);
        let mut r = sys::ifreq(bridge);
        r.ifr_ifru.ifru_ifindex = index;
        sys::ioctl_ifreq(ctl.as_fd(), req, &mut r).map_err(err)
    }

    fn run_script(&self, action: &'static str) -> Result<(), HotplugError> {
        let HostSetup::Script {
            script,
            bridge,
            gatewaydev,
        } = &self.setup
        else {
            return Ok(());
        };
        let path = script_path(script);
        let spawn_err = |source| HotplugError::Spawn {
            vif: self.vif,
            tap: self.tap.clone(),
            script: path.clone(),
            action,
            source,
        };
        let mut cmd = Command::new(&path);
        cmd.arg(action)
            .arg("type_if=vif")
            .env("script", &path)
            .env("XENBUS_TYPE", &self.xenbus.backend_type)
            .env("XENBUS_PATH", &self.xenbus.path)
            .env("XENBUS_BASE_PATH", "backend")
            .env("netdev", gatewaydev.as_deref().unwrap_or(""))
            .env("vif", &self.tap)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(b) = bridge {
            cmd.env("bridge", b);
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let mut stderr = child.stderr.take();
        let pid = child.id();
        let (tx, rx) = crossbeam_channel::bounded(1);
        // The script's stderr is read and the child reaped on a helper thread, so that a
        // hung script can be killed after SCRIPT_TIMEOUT.
        std::thread::Builder::new()
            .name(format!("hotplug-{}", self.tap))
            .spawn(move || {
                // Read to the end (a script must never block on a full pipe), keeping the
                // last 4 KiB for the error message.
                let mut err = Vec::new();
                if let Some(s) = stderr.as_mut() {
                    let mut chunk = [0u8; 4096];
                    while let Ok(n) = s.read(&mut chunk) {
                        if n == 0 {
                            break;
                        }
                        err.extend_from_slice(&chunk[..n]);
                        if err.len() > 8192 {
                            err.drain(..err.len() - 4096);
                        }
                    }
                }
                let status = child.wait();
                let _ = tx.send((status, err));
            })
            .map_err(spawn_err)?;
        let script_err = |status: String, stderr: String| HotplugError::Script {
            vif: self.vif,
            tap: self.tap.clone(),
            script: path.clone(),
            action,
            status,
            stderr,
        };
        match rx.recv_timeout(SCRIPT_TIMEOUT) {
            Ok((Ok(status), err)) if status.success() => {
                tracing::debug!(vif = %self.vif, action, stderr = %tail(&err), "hotplug script done");
                Ok(())
            }
            Ok((Ok(status), err)) => Err(script_err(status.to_string(), tail(&err))),
            Ok((Err(e), err)) => Err(script_err(format!("wait: {e}"), tail(&err))),
            Err(_) => {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                Err(script_err(
                    format!("timed out after {SCRIPT_TIMEOUT:?}, killed"),
                    String::new(),
                ))
            }
        }
    }
}

impl Drop for HostSide {
    fn drop(&mut self) {
        if let Err(e) = self.offline() {
            tracing::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_choose_script_over_bridge() {
        assert_eq!(
            HostSetup::from_keys(Some("vif-bridge"), Some("xenbr0")),
            HostSetup::Script {
                script: "vif-bridge".into(),
                bridge: Some("xenbr0".into()),
                gatewaydev: None
            }
        );
        assert_eq!(
            HostSetup::from_keys(Some(" "), Some("xenbr0")),
            HostSetup::Bridge("xenbr0".into())
        );
        assert_eq!(HostSetup::from_keys(None, None), HostSetup::None);
    }

    #[test]
    fn relative_scripts_come_from_the_xen_script_dir() {
        assert_eq!(
            script_path("vif-bridge"),
            PathBuf::from("/etc/xen/scripts/vif-bridge")
        );
        assert_eq!(script_path("/opt/x"), PathBuf::from("/opt/x"));
    }

    #[test]
    fn stderr_tail_keeps_the_last_512_characters() {
        let s = "x".repeat(1000) + "end";
        let t = tail(s.as_bytes());
        assert_eq!(t.chars().count(), 512);
        assert!(t.ends_with("end"));
    }
}

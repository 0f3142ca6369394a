//! The simulated toolstack: what libxl writes to xenstore when it builds a domain and adds a
//! PV device (`libxl__domain_make`, `libxl__device_generic_add`), done as dom0 through a real
//! xenstore client, so the nodes and their permissions are what a backend sees under xl.

use xen::DomId;
use xenbus::wire::{Perm, PermKind};
use xenbus::{XsClient, XsError, XsOps};

/// A PV device to add: its type, the two domains, and the type-specific keys.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Backend type, e.g. "vbd", "vif", "console".
    pub kind: String,
    /// Frontend directory name under `device/` (usually the same as `kind`).
    pub frontend_kind: String,
    /// The backend's domain (0 normally).
    pub backend_domid: DomId,
    /// The guest.
    pub frontend_domid: DomId,
    /// Device id.
    pub devid: u32,
    /// Extra backend keys (`params`, `mode`, `mac`, ...).
    pub backend: Vec<(String, String)>,
    /// Extra frontend keys (owned by the guest, like the directory).
    pub frontend: Vec<(String, String)>,
    /// Frontend keys the guest may read but not change (libxl's `ro_front`: owned by the
    /// backend domain), such as a console's `type`.
    pub frontend_ro: Vec<(String, String)>,
}

impl DeviceSpec {
    /// A device of `kind` with no extra keys.
    pub fn new(kind: &str, frontend_domid: DomId, devid: u32) -> Self {
        DeviceSpec {
            kind: kind.to_string(),
            frontend_kind: kind.to_string(),
            backend_domid: 0,
            frontend_domid,
            devid,
            backend: Vec::new(),
            frontend: Vec::new(),
            frontend_ro: Vec::new(),
        }
    }

    /// A disk served by a userspace backend, as xl writes one with `backendtype=qdisk`:
    /// backend `qdisk/<domid>/<devid>` with `params = "aio:<path>"`, `type = qdisk`, `mode`;
    /// frontend under `device/vbd/<devid>` with `virtual-device` and `device-type`.
    /// `devid` is the xenstore device number (51712 for xvda).
    pub fn qdisk(frontend_domid: DomId, devid: u32, path: &str, writable: bool) -> Self {
        let mut s = DeviceSpec::new("qdisk", frontend_domid, devid);
        s.frontend_kind = "vbd".into();
        let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
        s.backend = vec![
            kv("params", &format!("aio:{path}")),
            kv("removable", "0"),
            kv("bootable", "1"),
            kv("type", "qdisk"),
            kv("mode", if writable { "w" } else { "r" }),
            kv("device-type", "disk"),
            kv("discard-enable", "1"),
            kv("specification", "xen"),
        ];
        s.frontend = vec![
            kv("virtual-device", &devid.to_string()),
            kv("device-type", "disk"),
            kv("trusted", "1"),
        ];
        s
    }

    /// A network interface as `libxl__device_nic_add` writes one: backend
    /// `vif/<domid>/<devid>` (or `qnic`, the userspace-backend type) with `mac`, `bridge`,
    /// `handle`, `type = vif`, and `script`, `ip`, `rate` (`bytes,usec`) and `mtu` when given;
    /// frontend `device/vif/<devid>` with `handle`, `mac`, `mtu` and `trusted`.
    pub fn vif(frontend_domid: DomId, devid: u32, nic: &VifNic) -> Self {
        let mut s = DeviceSpec::new(&nic.backend_type, frontend_domid, devid);
        s.frontend_kind = "vif".into();
        let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
        let mac = nic
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        s.backend = vec![
            kv("mac", &mac),
            kv("handle", &devid.to_string()),
            kv("type", "vif"),
            kv("mtu", &nic.mtu.to_string()),
        ];
        if let Some(b) = &nic.bridge {
            s.backend.push(kv("bridge", b));
        }
        if let Some(sc) = &nic.script {
            s.backend.push(kv("script", sc));
        }
        if let Some(ip) = &nic.ip {
            s.backend.push(kv("ip", ip));
        }
        if let Some((bytes, usec)) = nic.rate {
            s.backend.push(kv("rate", &format!("{bytes},{usec}")));
        }
        s.frontend = vec![
            kv("handle", &devid.to_string()),
            kv("mac", &mac),
            kv("mtu", &nic.mtu.to_string()),
            kv("trusted", "1"),
        ];
        s
    }

    /// A secondary PV console served by a device model, as `libxl__device_console_add` writes
    /// it: backend `protocol = vt100`; frontend `type = ioemu` and `limit`, read-only to the
    /// guest.
    pub fn console(frontend_domid: DomId, devid: u32) -> Self {
        let mut s = DeviceSpec::new("console", frontend_domid, devid);
        s.backend.push(("protocol".into(), "vt100".into()));
        s.frontend_ro.push(("type".into(), "ioemu".into()));
        s.frontend_ro.push(("limit".into(), "1048576".into()));
        s
    }
    /// `/local/domain/<backend>/backend/<kind>/<domid>/<devid>`.
    pub fn backend_path(&self) -> String {
        format!(
            "/local/domain/{}/backend/{}/{}/{}",
            self.backend_domid, self.kind, self.frontend_domid, self.devid
        )
    }
    /// `/local/domain/<domid>/device/<kind>/<devid>`.
    pub fn frontend_path(&self) -> String {
        format!(
            "/local/domain/{}/device/{}/{}",
            self.frontend_domid, self.frontend_kind, self.devid
        )
    }
}

/// The settings of a [`DeviceSpec::vif`] (xl's `vif = [ 'mac=..,bridge=..,rate=..' ]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VifNic {
    /// `vif` (kernel netback) or `qnic` (a userspace backend).
    pub backend_type: String,
    /// The guest's MAC.
    pub mac: [u8; 6],
    /// `bridge`.
    pub bridge: Option<String>,
    /// `script`.
    pub script: Option<String>,
    /// `ip`.
    pub ip: Option<String>,
    /// `rate` as (bytes per interval, interval in microseconds).
    pub rate: Option<(u64, u32)>,
    /// `mtu`.
    pub mtu: u32,
}

impl Default for VifNic {
    fn default() -> Self {
        VifNic {
            backend_type: "vif".into(),
            mac: [0x00, 0x16, 0x3e, 0x00, 0x00, 0x01],
            bridge: None,
            script: None,
            ip: None,
            rate: None,
            mtu: 1500,
        }
    }
}

fn perms(owner: DomId, reader: DomId) -> [Perm; 2] {
    [
        Perm {
            kind: PermKind::None,
            domid: u32::from(owner),
        },
        Perm {
            kind: PermKind::Read,
            domid: u32::from(reader),
        },
    ]
}

/// The dom0 toolstack's view of xenstore.
#[derive(Debug, Clone)]
pub struct Toolstack {
    xs: XsClient,
}

impl Toolstack {
    /// A toolstack using `xs`, which must be a dom0 connection.
    pub fn new(xs: XsClient) -> Self {
        Toolstack { xs }
    }

    /// The dom0 client.
    pub fn xs(&self) -> &XsClient {
        &self.xs
    }

    /// Writes the nodes libxl creates for a new domain: `/local/domain/<id>` readable by the
    /// guest, `name` and `domid`, and the directories the guest may write.
    pub fn create_domain_nodes(&self, domid: DomId, name: &str) -> Result<(), XsError> {
        let dom = format!("/local/domain/{domid}");
        self.xs.transaction(|tx| {
            tx.mkdir(&dom)?;
            tx.set_perms(&dom, &perms(0, domid))?;
            tx.write(&format!("{dom}/name"), name.as_bytes())?;
            tx.write(&format!("{dom}/domid"), domid.to_string().as_bytes())?;
            for d in ["device", "control"] {
                tx.mkdir(&format!("{dom}/{d}"))?;
                tx.set_perms(&format!("{dom}/{d}"), &perms(0, domid))?;
            }
            for d in ["data", "control/shutdown", "drivers", "attr", "error"] {
                let p = format!("{dom}/{d}");
                tx.write(&p, b"")?;
                tx.set_perms(
                    &p,
                    &[Perm {
                        kind: PermKind::None,
                        domid: u32::from(domid),
                    }],
                )?;
            }
            Ok(())
        })
    }

    /// Adds a PV device as `libxl__device_generic_add` does: frontend directory owned by the
    /// guest and readable by the backend, backend directory owned by the backend domain and
    /// readable by the guest, both at state 1, backend `online = 1`.
    pub fn add_device(&self, spec: &DeviceSpec) -> Result<(), XsError> {
        let fe = spec.frontend_path();
        let be = spec.backend_path();
        self.xs.transaction(|tx| {
            tx.rm(&fe).or_else(ignore_missing)?;
            tx.rm(&be).or_else(ignore_missing)?;
            tx.mkdir(&fe)?;
            tx.set_perms(&fe, &perms(spec.frontend_domid, spec.backend_domid))?;
            tx.write(&format!("{fe}/backend"), be.as_bytes())?;
            tx.write(
                &format!("{fe}/backend-id"),
                spec.backend_domid.to_string().as_bytes(),
            )?;
            tx.write(&format!("{fe}/state"), b"1")?;
            for (k, v) in &spec.frontend {
                tx.write(&format!("{fe}/{k}"), v.as_bytes())?;
            }
            for (k, v) in &spec.frontend_ro {
                let p = format!("{fe}/{k}");
                tx.write(&p, v.as_bytes())?;
                tx.set_perms(&p, &perms(spec.backend_domid, spec.frontend_domid))?;
            }
            tx.mkdir(&be)?;
            tx.set_perms(&be, &perms(spec.backend_domid, spec.frontend_domid))?;
            tx.write(&format!("{be}/frontend"), fe.as_bytes())?;
            tx.write(
                &format!("{be}/frontend-id"),
                spec.frontend_domid.to_string().as_bytes(),
            )?;
            tx.write(&format!("{be}/online"), b"1")?;
            tx.write(&format!("{be}/state"), b"1")?;
            for (k, v) in &spec.backend {
                tx.write(&format!("{be}/{k}"), v.as_bytes())?;
            }
            Ok(())
        })
    }

    /// Asks the backend to let the device go (libxl's device removal: `online = 0` and
    /// `state = 5`). The caller waits for the backend to reach Closed, then calls
    /// [`Toolstack::remove_device_nodes`].
    pub fn request_device_removal(&self, spec: &DeviceSpec) -> Result<(), XsError> {
        let be = spec.backend_path();
        self.xs.transaction(|tx| {
            tx.write(&format!("{be}/online"), b"0")?;
            tx.write(&format!("{be}/state"), b"5")?;
            Ok(())
        })
    }

    /// Removes both directories of a device.
    pub fn remove_device_nodes(&self, spec: &DeviceSpec) -> Result<(), XsError> {
        let (fe, be) = (spec.frontend_path(), spec.backend_path());
        self.xs.transaction(|tx| {
            tx.rm(&fe).or_else(ignore_missing)?;
            tx.rm(&be).or_else(ignore_missing)?;
            Ok(())
        })
    }
}

fn ignore_missing(e: XsError) -> Result<(), XsError> {
    if e.is_not_found() {
        Ok(())
    } else {
        Err(e)
    }
}

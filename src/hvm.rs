//! `domio hvm`: the ioreq server and device model of one HVM guest. The machine (PCI bus,
//! Xen platform device, COM1, virtio-blk disks) is built from the guest's `.hvm` file, its
//! ranges are registered with the ioreq server, guest RAM is foreign-mapped, and the server
//! runs until SIGTERM, SIGINT or SIGHUP.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use devmodel::config::MachineConfig;
use devmodel::mem::ForeignRam;
use devmodel::Machine;
use ioreq::{IoreqConfig, IoreqServer, IoreqStats};
use tracing::info;
use xen::{DeviceModel, DomId};

use crate::target::Target;

/// Arguments of `domio hvm`.
#[derive(Debug, Args)]
pub struct HvmArgs {
    /// The guest domain.
    #[arg(long)]
    pub domid: u32,
    /// The guest's xl.cfg-style `.hvm` file.
    #[arg(long)]
    pub config: std::path::PathBuf,
    /// Xen host: `linux` (this dom0's /dev/xen) or `sim:PATH` (a `domio sim`).
    #[arg(long, default_value = "linux")]
    pub xen: Target,
    /// The domain domio runs in.
    #[arg(long, default_value_t = 0)]
    pub backend_domid: DomId,
    /// Microseconds the ioreq thread polls its pages after work before sleeping (0: never).
    #[arg(long, default_value_t = 20)]
    pub poll_us: u64,
    /// Serve a control socket here (JSON lines, QMP-shaped): `stats` (the ioreq server's
    /// counters) and `devices` (the machine and its serial console).
    #[arg(long)]
    pub control: Option<std::path::PathBuf>,
}

/// What the control socket can report about a running device model.
#[derive(Debug, Clone)]
pub struct HvmInfo {
    /// The guest.
    pub domid: DomId,
    /// One line per device, as logged at start.
    pub devices: Vec<String>,
    /// The serial console ("pty:/dev/pts/N", ...).
    pub console: Option<String>,
    /// The ioreq server's counters.
    pub stats: Arc<IoreqStats>,
}

impl HvmInfo {
    /// The `devices` answer: `{"domid":N,"devices":[...],"console":...}`.
    pub fn devices_json(&self) -> serde_json::Value {
        serde_json::json!({
            "domid": self.domid,
            "devices": self.devices,
            "console": self.console,
        })
    }

    /// The `stats` answer: the ioreq server's counters.
    pub fn stats_json(&self) -> serde_json::Value {
        let s = &self.stats;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "domid": self.domid,
            "ioreq": {
                "sync": g(&s.sync),
                "buffered": g(&s.buffered),
                "accesses": g(&s.accesses),
                "bad": g(&s.bad),
                "unclaimed": g(&s.unclaimed),
                "ram_errors": g(&s.ram_errors),
                "invalidates": g(&s.invalidates),
                "suppressed_logs": g(&s.suppressed_logs),
                "handler_panics": g(&s.handler_panics),
                "missed_events": g(&s.missed_events),
                "renotified": g(&s.renotified),
                "sweeps": g(&s.sweeps),
            }
        })
    }
}

impl crate::control::ControlTarget for HvmInfo {
    fn domid(&self) -> u32 {
        u32::from(self.domid)
    }

    fn execute(&self, cmd: &str, _args: &serde_json::Value) -> Option<serde_json::Value> {
        match cmd {
            "stats" => Some(serde_json::json!({ "return": self.stats_json() })),
            "devices" => Some(serde_json::json!({ "return": self.devices_json() })),
            _ => None,
        }
    }
}

/// A running device model.
pub struct Hvm {
    info: HvmInfo,
    server: IoreqServer,
}

impl Hvm {
    /// Builds the machine for `domid` from `cfg` on `host` and starts serving it.
    pub fn start(
        host: &dyn xen::XenHost,
        domid: DomId,
        cfg: &MachineConfig,
        poll: std::time::Duration,
    ) -> anyhow::Result<Hvm> {
        let ram_bytes = cfg.memory_mib << 20;
        let mut icfg = IoreqConfig::new(domid, cfg.vcpus, ram_bytes);
        icfg.spin = poll;
        let mut server = IoreqServer::create(host, icfg)
            .with_context(|| format!("creating the ioreq server for dom{domid}"))?;
        let dm: Arc<dyn DeviceModel> = Arc::from(
            host.open_devmodel()
                .context("opening the device-model handle")?,
        );
        let fm = host
            .open_foreign()
            .context("opening the foreign-memory handle")?;
        let ram = ForeignRam::new(fm, domid, ram_bytes);
        let machine = Machine::new(domid, cfg, server.ranges(), dm, Box::new(ram))
            .with_context(|| format!("building the machine of {}", cfg.name))?;
        let info = HvmInfo {
            domid,
            devices: machine.devices().to_vec(),
            console: machine.serial_console().map(str::to_string),
            stats: server.stats(),
        };
        server
            .run(Box::new(machine))
            .with_context(|| format!("starting the ioreq server for dom{domid}"))?;
        Ok(Hvm { info, server })
    }

    /// What the control socket reports.
    pub fn info(&self) -> &HvmInfo {
        &self.info
    }

    /// Stops serving: the ioreq thread ends, the server is disabled and destroyed, the
    /// machine (its queue threads and console) is dropped.
    pub fn stop(mut self) {
        self.server.shutdown();
    }
}

/// Runs the device model.
pub fn run(a: HvmArgs) -> anyhow::Result<ExitCode> {
    let domid = DomId::try_from(a.domid)
        .ok()
        .filter(|d| *d != 0 && *d < xen::DOMID_SELF)
        .ok_or_else(|| anyhow::anyhow!("--domid {}: not a guest domain id", a.domid))?;
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let cfg = MachineConfig::parse(&text).with_context(|| format!("{}", a.config.display()))?;
    let signals = crate::signals::termination()?;
    let host = a.xen.open(a.backend_domid)?;
    let hvm = Hvm::start(
        host.as_ref(),
        domid,
        &cfg,
        std::time::Duration::from_micros(a.poll_us),
    )?;
    info!(domid, name = %cfg.name, vcpus = cfg.vcpus, memory_mib = cfg.memory_mib, xen = %host.describe(), "domio hvm serving");
    info!(domid, devices = %hvm.info().devices_json(), "machine");
    let control = match &a.control {
        Some(p) => Some(crate::control::Control::start(
            p,
            Arc::new(hvm.info().clone()),
        )?),
        None => None,
    };
    let sig = signals
        .recv()
        .map(|s| s.as_str())
        .unwrap_or("channel closed");
    info!(domid, signal = sig, stats = %hvm.info().stats_json(), "shutting down the device model");
    drop(control);
    hvm.stop();
    info!("domio hvm stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use xensim::guestos::pci::{self, BarWindow};
    use xensim::guestos::platform::{self, Unplug};
    use xensim::guestos::uart::Uart;
    use xensim::hvm::HvmGuest;

    #[test]
    fn hvm_serves_a_guest_attached_through_the_sim_daemon_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let host = xensim::host::Host::new().unwrap();
        let domid = host.create_hvm_domain("g", 32 << 8, 1).unwrap();
        let server =
            xensim::server::Server::start(host.clone(), &dir.path().join("x.sock")).unwrap();
        let target: Target = format!("sim:{}", server.path().display()).parse().unwrap();
        let sim = target.open(0).unwrap();
        let log = dir.path().join("com1.log");
        let disk = dir.path().join("d.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let cfg = MachineConfig::parse(&format!(
            "name = 'g'\ntype = 'hvm'\nmemory = 32\nserial = 'file:{}'\ndisk = [ '{},raw,xvda,rw' ]\n",
            log.display(),
            disk.display()
        ))
        .unwrap();
        let hvm = Hvm::start(sim.as_ref(), domid, &cfg, ioreq::server::DEFAULT_POLL).unwrap();
        let info = hvm.info().clone();
        assert_eq!(info.devices.len(), 5, "{:?}", info.devices);
        assert!(info.devices_json()["devices"][3]
            .as_str()
            .unwrap()
            .contains("virtio-blk xvda"));
        let mut g = HvmGuest::new(host.clone(), domid, 0).unwrap();
        g.set_timeout(Duration::from_secs(20));
        let mut fns = pci::enumerate(&g).unwrap();
        assert_eq!(fns.len(), 4);
        pci::assign_bars(&g, &mut fns, &mut BarWindow::default()).unwrap();
        assert_eq!(
            platform::unplug(&g, 1, 1, 3).unwrap(),
            Unplug::Done { version: 1 }
        );
        Uart::COM1.init(&g).unwrap();
        Uart::COM1.write(&g, b"hello from domio hvm\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"hello from domio hvm\n");
        assert!(info.stats_json()["ioreq"]["sync"].as_u64().unwrap() > 0);

        // The control socket answers devices and stats, and errors for the rest.
        let sock = dir.path().join("ctl.sock");
        let control = crate::control::Control::start(&sock, Arc::new(info.clone())).unwrap();
        let mut conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(conn.try_clone().unwrap()));
        let greeting: serde_json::Value =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(greeting["domio"]["domid"], u32::from(domid));
        let mut ask = |req: &str| -> serde_json::Value {
            std::io::Write::write_all(&mut conn, format!("{req}\n").as_bytes()).unwrap();
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap()
        };
        let devices = ask(r#"{"execute":"devices"}"#);
        assert!(devices["return"]["devices"][3]
            .as_str()
            .unwrap()
            .contains("virtio-blk xvda"));
        let stats = ask(r#"{"execute":"stats"}"#);
        assert!(stats["return"]["ioreq"]["sync"].as_u64().unwrap() > 0);
        assert_eq!(ask("not json")["error"]["class"], "GenericError");
        assert_eq!(
            ask(r#"{"execute":"quit"}"#)["error"]["class"],
            "CommandNotFound"
        );
        assert_eq!(ask("{}")["error"]["class"], "GenericError");
        drop(control);
        hvm.stop();
        // The server is gone: the guest's accesses are unclaimed now.
        assert_eq!(pci::cfg_read(&g, 0, 0, 0, 0, 4).unwrap(), 0xffff_ffff);
    }
}

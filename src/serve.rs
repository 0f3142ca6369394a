//! `domio serve`: attach to a Xen host and serve one guest's PV backends.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context};
use backends::blk::{default_engine_factory, BlkConfig, BlkDriver, BlkStats, GrantMode};
use backends::console::{ConsoleDriver, ConsoleLimits, ConsoleSink, ConsoleStats, LogSink};
use backends::net::tap::tap_engine_factory;
use backends::net::{NetConfig, NetDriver, NetEngineFactory, NetStats};
use clap::Args;
use tracing::{info, info_span, warn};
use xen::{DomId, XenHost, XsTransport};
use xenbus::backend::{BackendDriver, BackendWatcher, DeviceInfo};
use xenbus::{XsClient, XsOps};

use crate::target::Target;

/// Backend types this build serves.
pub const AVAILABLE_TYPES: &[&str] = &["console", "qdisk", "vbd", "vif", "qnic"];

/// Arguments of `domio serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The guest domain whose backends to serve.
    #[arg(long, value_parser = parse_guest_domid)]
    pub domid: DomId,
    /// Xen host: `linux` (this dom0's /dev/xen and xenstored) or `sim:PATH` (a `domio sim`).
    #[arg(long, default_value = "linux")]
    pub xen: Target,
    /// Backend types to serve, comma-separated: `console`, `qdisk` (disks xl gives to a
    /// userspace backend), `vbd` (only where the kernel's blkback is not loaded, or both
    /// would serve the same disks), `vif` (NICs; only where the kernel's netback is not
    /// loaded) and `qnic` (NICs of a userspace backend).
    #[arg(long, value_delimiter = ',', default_value = "console,qdisk")]
    pub backend_types: Vec<String>,
    /// How to reach xenstored on Linux: the unix socket or /dev/xen/xenbus.
    #[arg(long, value_enum, default_value_t = XsKind::Socket)]
    pub xenstore: XsKind,
    /// Path of the xenstored socket (default /run/xenstored/socket).
    #[arg(long)]
    pub xenstore_path: Option<PathBuf>,
    /// Serve a control socket here (JSON lines: `stats`, `devices`, `resize`).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// The domain domio runs in (the backend domain).
    #[arg(long, default_value_t = 0)]
    pub backend_domid: DomId,
    /// How disks reach the guest's data pages: `persistent` (mapped once and kept, when the
    /// frontend agrees, else mapped per request), `map` (mapped per request; no
    /// `feature-persistent`) or `copy` (grant-copied to and from domio's own pages: no guest
    /// page is ever mapped). docs/PERFORMANCE.md has the three measured.
    #[arg(long, value_enum, default_value_t = BlkGrants::Persistent)]
    pub blk_grants: BlkGrants,
    /// Before a disk's ring thread sleeps, it busy-polls its ring and its storage for up to
    /// this many microseconds (0, the default: it sleeps at once). Trades dom0 CPU time for
    /// latency and IOPS; docs/PERFORMANCE.md has figures.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub blk_poll_us: u32,
}

/// `--blk-grants`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BlkGrants {
    /// Persistent grants when the frontend offers them (the default, as Linux's blkback).
    Persistent,
    /// Map and unmap each request's pages.
    Map,
    /// Grant copy into and out of private pages.
    Copy,
}

impl BlkGrants {
    /// The block backend's settings for this choice (the rest at their defaults).
    pub fn config(self) -> BlkConfig {
        BlkConfig {
            grant_mode: if self == BlkGrants::Copy {
                GrantMode::Copy
            } else {
                GrantMode::Map
            },
            persistent_grants: self == BlkGrants::Persistent,
            ..BlkConfig::default()
        }
    }
}

/// xenstore transport choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XsKind {
    /// The xenstored unix socket.
    Socket,
    /// The kernel's /dev/xen/xenbus.
    Device,
}

fn parse_guest_domid(s: &str) -> Result<DomId, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a domain id"))?;
    if n == 0 || n >= u32::from(xen::DOMID_SELF) {
        return Err(format!(
            "{n} is not a guest domain id (expected 1..{})",
            xen::DOMID_SELF - 1
        ));
    }
    Ok(n as DomId)
}

/// Checks the requested backend types and says clearly what is not available.
pub fn check_types(types: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for t in types {
        let t = t.trim();
        if AVAILABLE_TYPES.contains(&t) {
            if !out.iter().any(|o: &String| o == t) {
                out.push(t.to_string());
            }
        } else {
            bail!(
                "unknown backend type {t:?} (available: {})",
                AVAILABLE_TYPES.join(",")
            );
        }
    }
    if out.is_empty() {
        bail!(
            "--backend-types is empty (available: {})",
            AVAILABLE_TYPES.join(",")
        );
    }
    Ok(out)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running set of backends for one guest.
pub struct Service {
    domid: DomId,
    watchers: Mutex<Vec<BackendWatcher>>,
    console: Option<Arc<ConsoleDriver>>,
    blk: Vec<Arc<BlkDriver>>,
    net: Vec<Arc<NetDriver>>,
    xs: XsClient,
}

impl Service {
    /// Starts serving `types` of guest `domid` on `host`, disks with the settings `blk`, NICs'
    /// host sides from `net` ([`tap_engine_factory`] unless the toolstack runs the scripts).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        host: Arc<dyn XenHost>,
        xs: XsClient,
        own: DomId,
        domid: DomId,
        types: &[String],
        sink: Arc<dyn ConsoleSink>,
        blk: BlkConfig,
        net: NetEngineFactory,
    ) -> anyhow::Result<Service> {
        let span = info_span!("domio", domid);
        let _g = span.enter();
        let dom_path = format!("/local/domain/{domid}");
        match xs.try_read(&dom_path) {
            Ok(Some(_)) => {}
            Ok(None) => {
                warn!("{dom_path} does not exist yet: is dom{domid} running? serving anyway")
            }
            Err(e) => warn!("cannot read {dom_path}: {e}"),
        }
        let mut svc = Service {
            domid,
            watchers: Mutex::new(Vec::new()),
            console: None,
            blk: Vec::new(),
            net: Vec::new(),
            xs: xs.clone(),
        };
        for t in types {
            let driver: Arc<dyn BackendDriver> = match t.as_str() {
                "console" => {
                    let d =
                        ConsoleDriver::new(host.clone(), sink.clone(), ConsoleLimits::default());
                    svc.console = Some(d.clone());
                    d
                }
                "vbd" | "qdisk" => {
                    let d = BlkDriver::new(host.clone(), t, blk, default_engine_factory());
                    svc.blk.push(d.clone());
                    d
                }
                "vif" | "qnic" => {
                    let d = NetDriver::new(host.clone(), t, NetConfig::default(), net.clone());
                    svc.net.push(d.clone());
                    d
                }
                other => bail!("unknown backend type {other:?}"),
            };
            let w = BackendWatcher::start(xs.clone(), driver, u32::from(own), u32::from(domid))
                .with_context(|| format!("watching {t} backends of dom{domid}"))?;
            info!(backend = %t, dir = %w.backend_dir(), "serving");
            lock(&svc.watchers).push(w);
        }
        Ok(svc)
    }

    /// Device states, per backend type.
    pub fn devices(&self) -> Vec<(String, Vec<DeviceInfo>)> {
        lock(&self.watchers)
            .iter()
            .map(|w| {
                (
                    w.backend_dir()
                        .rsplit('/')
                        .nth(1)
                        .unwrap_or("?")
                        .to_string(),
                    w.devices(),
                )
            })
            .collect()
    }

    /// Console counters.
    pub fn console_stats(&self) -> Vec<((u32, u32), ConsoleStats)> {
        self.console.as_ref().map(|c| c.stats()).unwrap_or_default()
    }

    /// The guest being served.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Disk counters of every block backend type: ((domid, devid), stats).
    pub fn blk_stats(&self) -> Vec<((u32, u32), BlkStats)> {
        self.blk.iter().flat_map(|d| d.stats()).collect()
    }

    /// NIC counters of every network backend type: ((domid, devid), stats).
    pub fn net_stats(&self) -> Vec<((u32, u32), NetStats)> {
        self.net.iter().flat_map(|d| d.stats()).collect()
    }

    /// The console driver (to send input).
    pub fn console(&self) -> Option<&Arc<ConsoleDriver>> {
        self.console.as_ref()
    }

    /// Whether the guest's xenstore home exists (None if xenstore cannot say).
    pub fn domain_exists(&self) -> Option<bool> {
        self.xs
            .try_read(&format!("/local/domain/{}", self.domid))
            .ok()
            .map(|v| v.is_some())
    }

    /// Why the service can no longer work, if it cannot: xenstore is gone, or a backend
    /// watcher stopped on its own.
    pub fn failure(&self) -> Option<String> {
        if let Some(why) = self.xs.dead_reason() {
            return Some(format!("the xenstore connection is gone: {why}"));
        }
        lock(&self.watchers)
            .iter()
            .find(|w| w.is_finished())
            .map(|w| format!("the backend watcher of {} stopped", w.backend_dir()))
    }

    /// Stops everything: each device is disconnected and its backend state set to Closed.
    pub fn stop(&self) {
        let watchers = std::mem::take(&mut *lock(&self.watchers));
        for w in watchers {
            w.stop();
        }
    }

    /// Online resize of a disk (`xen_blkbk_resize`): re-reads the image size and tells the
    /// frontend. Returns the new size in sectors.
    pub fn resize(&self, devid: u32) -> anyhow::Result<u64> {
        let mut last = None;
        for d in &self.blk {
            match d.resize(u32::from(self.domid), devid) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(e.into()),
            None => bail!("no block backend is being served"),
        }
    }
}

/// Opens the xenstore connection for `args`.
pub fn open_xenstore(
    host: &dyn XenHost,
    kind: XsKind,
    path: Option<&PathBuf>,
) -> anyhow::Result<XsClient> {
    let transport = match kind {
        XsKind::Socket => XsTransport::Socket(path.map(|p| p.display().to_string())),
        XsKind::Device => XsTransport::Device,
    };
    let stream = host
        .open_xenstore(&transport)
        .with_context(|| format!("connecting to xenstore ({transport:?})"))?;
    XsClient::new(stream).context("starting the xenstore client")
}

/// Waits until the service should end: a termination signal, a `quit` from `quit`, the
/// guest destroyed (after it was `seen` to exist: a toolstack that destroys the domain as
/// soon as we report ready must not find us not yet knowing it was there), or the service
/// failing. Returns the reason and whether it is a failure.
pub fn wait_for_end<T>(
    svc: &Service,
    mut seen: bool,
    signals: &crossbeam_channel::Receiver<nix::sys::signal::Signal>,
    released: xenbus::Watch,
    quit: &crossbeam_channel::Receiver<T>,
) -> anyhow::Result<(String, bool)> {
    let (rel_tx, rel_rx) = crossbeam_channel::bounded::<()>(1);
    std::thread::Builder::new()
        .name("release-watch".into())
        .spawn(move || {
            // Ends (dropping the sender) when the watch closes, i.e. xenstore is gone.
            while released.recv().is_some() {
                let _ = rel_tx.try_send(());
            }
        })
        .context("starting the @releaseDomain thread")?;
    let domid = svc.domid();
    Ok(loop {
        crossbeam_channel::select! {
            recv(signals) -> s => break (format!("signal {}", s.map(|s| s.as_str()).unwrap_or("?")), false),
            recv(quit) -> _ => break ("asked to quit".to_string(), false),
            recv(rel_rx) -> r => {
                if r.is_err() {
                    break (svc.failure().unwrap_or_else(|| "the @releaseDomain watch closed".into()), true);
                }
                match svc.domain_exists() {
                    Some(true) => seen = true,
                    Some(false) if seen => break (format!("dom{domid} was destroyed"), false),
                    _ => {}
                }
            }
            // Health check: a dead xenstore connection or a stopped watcher ends the service.
            default(Duration::from_secs(1)) => {
                if let Some(why) = svc.failure() {
                    break (why, true);
                }
                match svc.domain_exists() {
                    Some(true) => seen = true,
                    Some(false) if seen => break (format!("dom{domid} was destroyed"), false),
                    _ => {}
                }
            }
        }
    })
}

/// Runs `domio serve`.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let types = check_types(&args.backend_types)?;
    let signals = crate::signals::termination()?;
    let host: Arc<dyn XenHost> = Arc::from(args.xen.open(args.backend_domid)?);
    let xs = open_xenstore(host.as_ref(), args.xenstore, args.xenstore_path.as_ref())?;
    // Wake up when any domain dies, to leave when ours is gone.
    let released = xs
        .watch("@releaseDomain", "domio-release")
        .context("watching @releaseDomain")?;
    let svc = Service::start(
        host.clone(),
        xs,
        args.backend_domid,
        args.domid,
        &types,
        Arc::new(LogSink),
        BlkConfig {
            poll_us: args.blk_poll_us,
            ..args.blk_grants.config()
        },
        tap_engine_factory(),
    )?;
    let svc = Arc::new(svc);
    let control = match &args.control {
        Some(p) => Some(crate::control::Control::start(p, svc.clone())?),
        None => None,
    };
    // Looked at before the "domio serving" line (see `wait_for_end`).
    let seen = svc.domain_exists() == Some(true);
    info!(domid = args.domid, xen = %host.describe(), types = %types.join(","), "domio serving");
    let (reason, failed) = wait_for_end(
        &svc,
        seen,
        &signals,
        released,
        &crossbeam_channel::never::<()>(),
    )?;
    info!(%reason, "shutting down: closing devices");
    for (t, devs) in svc.devices() {
        for d in devs {
            info!(backend = %t, devid = d.devid, state = %d.state, "device at shutdown");
        }
    }
    drop(control);
    Ok(stop(&svc, &reason, failed))
}

/// Stops the service and says how it ended: exit status 1 if it ended because it could no
/// longer serve.
pub fn stop(svc: &Service, reason: &str, failed: bool) -> ExitCode {
    svc.stop();
    if failed {
        tracing::error!(%reason, "domio stopped because it could no longer serve");
        return ExitCode::from(1);
    }
    info!("domio stopped cleanly");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_check_types_names_missing_backends_clearly() {
        assert_eq!(
            check_types(&["console".into(), "console".into()]).unwrap(),
            vec!["console".to_string()]
        );
        assert_eq!(
            check_types(&["vif".into(), "qnic".into()]).unwrap(),
            vec!["vif".to_string(), "qnic".to_string()]
        );
        let e = check_types(&["bogus".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown backend type \"bogus\""), "{e}");
    }

    #[test]
    fn test_parse_guest_domid_rejects_dom0_and_specials() {
        assert_eq!(parse_guest_domid("5"), Ok(5));
        assert!(parse_guest_domid("0").is_err());
        assert!(parse_guest_domid("32752").is_err());
        assert!(parse_guest_domid("x").is_err());
    }
}

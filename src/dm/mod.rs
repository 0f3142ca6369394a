//! domio as the device model xl spawns for a guest (`device_model_override=`): the qemu-style
//! command line libxl builds ([`argv`]), QMP on the sockets it names ([`qmp`]), and the
//! readiness handshake it waits for (`/local/domain/0/device-model/<domid>/state = running`).
//!
//! For a PV guest (`-machine xenpv`) the device model serves the guest's `qdisk` disks, and
//! its `vif` NICs where the kernel's netback is not loaded. libxl runs the NICs' hotplug
//! scripts itself once a backend reaches InitWait, so domio only creates the taps. The
//! primary console stays with xenconsoled. For an HVM guest (`-machine xenfv`) domio is also
//! the ioreq server: the machine of `domio hvm` (i440FX, PIIX3, the Xen platform device, COM1
//! on a pty that `query-chardev` reports as `serial0`, the chipset ports Xen forwards, and
//! fw_cfg for `-kernel`), with the disks and NICs served PV.

pub mod argv;
pub mod client;
pub mod qmp;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use backends::console::LogSink;
use backends::net::tap::tap_engine_factory_toolstack_hotplug;
use tracing::{info, warn};
use xen::{DomId, XenHost};
use xenbus::wire::{Perm, PermKind};
use xenbus::{XsClient, XsOps};

use crate::serve::{open_xenstore, wait_for_end, BlkGrants, Service, XsKind};
use argv::{DmArgs, Machine};

/// Whether the kernel's netback serves `vif` backends on this host.
fn kernel_netback_loaded() -> bool {
    std::path::Path::new("/sys/module/xen_netback").exists()
}

/// The backend types a PV device model serves here.
fn pv_backend_types(kernel_netback: bool) -> Vec<String> {
    let mut t = vec!["qdisk".to_string()];
    if !kernel_netback {
        t.push("vif".to_string());
    }
    t
}

/// Why the command line cannot be served at all, if it cannot.
fn refusal(a: &DmArgs) -> Option<String> {
    if let Some(acc) = &a.foreign_accel {
        return Some(format!(
            "accelerator {acc:?}: domio is a Xen device model and only runs with accel=xen"
        ));
    }
    if let Some(inc) = &a.incoming {
        return Some(format!(
            "-incoming {inc}: domio cannot restore a device model's state from a stream; save and restore of guests with domio as device model are not supported"
        ));
    }
    None
}

/// The HVM machine a `-machine xenfv` command line asks for: memory, vCPUs and COM1 from
/// `-m`, `-smp` and the first `-serial`. Disks and NICs stay PV (served as backends, as the
/// guest's PV drivers use them after the unplug handshake).
fn hvm_config(a: &DmArgs, name: &str) -> anyhow::Result<devmodel::config::MachineConfig> {
    let serial = match a.serial.first().map(String::as_str) {
        None | Some("none" | "null" | "/dev/null") => "none".to_string(),
        Some("pty") => "pty".to_string(),
        Some(s) if s.starts_with("unix:") || s.starts_with("file:") => s.to_string(),
        Some(other) => {
            bail!("-serial {other}: domio's COM1 takes pty, unix:PATH,server, file:PATH or none")
        }
    };
    let memory = a
        .memory_mib
        .context("-m is missing: an HVM device model needs the guest's memory size")?;
    let text = format!(
        "name = \"{}\"\ntype = \"hvm\"\nmemory = {memory}\nvcpus = {}\nserial = \"{serial}\"\n",
        name.replace(['"', '\\', '\n'], "_"),
        // Every vCPU the guest may bring up has an ioreq slot (Xen fills vp_eport for
        // maxvcpus), so the machine is sized for the maximum.
        a.max_vcpus.or(a.vcpus).unwrap_or(1)
    );
    let mut cfg = devmodel::config::MachineConfig::parse(&text)
        .context("the machine from the command line")?;
    if let Some(kernel) = &a.kernel {
        cfg.kernel = Some(devmodel::config::KernelBoot {
            kernel: kernel.clone(),
            initrd: a.initrd.clone(),
            cmdline: a.append.clone().unwrap_or_default(),
            rom: std::env::var_os("DOMIO_LINUXBOOT_ROM")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(LINUXBOOT_ROM)),
        });
    }
    Ok(cfg)
}

/// The option ROM that loads a `-kernel` through fw_cfg: QEMU's, as Debian installs it
/// (package qemu-system-data); `DOMIO_LINUXBOOT_ROM` names another.
pub const LINUXBOOT_ROM: &str = "/usr/share/qemu/linuxboot.bin";

/// What was asked for and is not emulated (said once in the device-model log).
fn not_emulated(a: &DmArgs) -> Vec<String> {
    let mut out = Vec::new();
    for d in &a.drives {
        out.push(format!(
            "-drive if={} {} (the guest's disks are served through PV)",
            d.interface, d.file
        ));
    }
    for d in &a.devices {
        let mac = d
            .prop("mac")
            .map(|m| format!(" mac={m}"))
            .unwrap_or_default();
        out.push(format!("-device {}{mac}", d.driver));
    }
    for n in a.netdevs.iter().filter(|n| emu_tap_name(n).is_none()) {
        out.push(format!(
            "-netdev {} {}",
            n.kind,
            n.ifname.as_deref().unwrap_or("")
        ));
    }
    // An HVM machine's COM1 is the first -serial; a PV one has none.
    let used = usize::from(a.machine == Machine::XenFv);
    out.extend(a.serial.iter().skip(used).map(|s| format!("-serial {s}")));
    out
}

/// The tap an emulated NIC's `-netdev type=tap,ifname=...` names, if domio creates it.
fn emu_tap_name(n: &argv::Netdev) -> Option<&str> {
    if n.kind == "tap" {
        n.ifname.as_deref()
    } else {
        None
    }
}

/// The device number in libxl's `vif<domid>.<devid>-emu`, or `fallback`.
fn emu_tap_devid(name: &str, fallback: u32) -> u32 {
    name.strip_prefix("vif")
        .and_then(|r| r.split_once('.'))
        .and_then(|(_, r)| r.strip_suffix("-emu"))
        .and_then(|d| d.parse().ok())
        .unwrap_or(fallback)
}

/// Creates the taps of the emulated NICs libxl asked for (`type=ioemu` vifs of an HVM guest).
/// QEMU would create them; libxl then runs the vif hotplug script on each (`type_if=tap`), and
/// `xl create` fails if the tap is missing. domio has no emulated NIC, so they carry nothing:
/// the guest unplugs emulated NICs and uses the PV vif, which domio serves. Closed at exit.
fn open_emulated_nic_taps(
    a: &DmArgs,
    domid: DomId,
) -> anyhow::Result<Vec<backends::net::tap::Tap>> {
    use backends::net::tap::{Tap, TapOptions, VifId};
    let mut taps = Vec::new();
    for (i, n) in a.netdevs.iter().enumerate() {
        let Some(name) = emu_tap_name(n) else {
            continue;
        };
        let vif = VifId {
            domid,
            devid: emu_tap_devid(name, i as u32),
        };
        let opts = TapOptions {
            name: Some(name.to_string()),
            up: false,
            ..TapOptions::default()
        };
        let tap = Tap::open(vif, &opts)
            .with_context(|| format!("creating tap {name} for -netdev id={}", n.id))?;
        info!(
            domid, tap = name,
            "tap for the emulated NIC libxl asked for: created for libxl's hotplug script; it carries no traffic (domio emulates no NIC; the guest's PV vif does)"
        );
        taps.push(tap);
    }
    Ok(taps)
}

/// The device-model directory libxl watches.
fn dm_path(domid: DomId) -> String {
    format!("/local/domain/0/device-model/{domid}")
}

/// Writes `backends/<type>` for every type served (readable by the guest, as QEMU writes
/// them) and then `state = running`, the line libxl waits for.
fn announce(xs: &XsClient, domid: DomId, types: &[String]) -> anyhow::Result<()> {
    let dir = dm_path(domid);
    let perms = [
        Perm {
            kind: PermKind::None,
            domid: 0,
        },
        Perm {
            kind: PermKind::Read,
            domid: u32::from(domid),
        },
    ];
    for t in types {
        let p = format!("{dir}/backends/{t}");
        xs.write(&p, b"").with_context(|| format!("writing {p}"))?;
        xs.set_perms(&p, &perms)
            .with_context(|| format!("setting the permissions of {p}"))?;
    }
    xs.write(&format!("{dir}/state"), b"running")
        .with_context(|| format!("writing {dir}/state"))?;
    Ok(())
}

/// Runs domio from libxl's qemu-style argv (without argv[0]).
pub fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    // Before any thread exists, so that every thread inherits the blocked mask.
    let signals = crate::signals::termination()?;
    let a = argv::parse(args).context("reading the device model command line")?;
    let name = a.name.clone().unwrap_or_else(|| format!("dom{}", a.domid));
    if let Some(why) = refusal(&a) {
        bail!("cannot be the device model of {name}: {why}");
    }
    let domid = DomId::try_from(a.domid).context("domid out of range")?;
    let skipped = not_emulated(&a);
    if !skipped.is_empty() {
        warn!(guest = %name, "not emulated by domio, ignored: {}", skipped.join("; "));
    }
    if !a.ignored.is_empty() {
        info!(guest = %name, "options without effect here: {}", a.ignored.join(" "));
    }
    // The Xen host: this dom0's, or a xensim daemon named in DOMIO_XEN (`sim:PATH`), since a
    // qemu command line has no place to say so.
    let target: crate::target::Target = match std::env::var("DOMIO_XEN") {
        Ok(t) => t
            .parse()
            .map_err(|e| anyhow::anyhow!("DOMIO_XEN={t:?}: {e}"))?,
        Err(_) => crate::target::Target::Linux,
    };
    let host: Arc<dyn XenHost> = Arc::from(target.open(0)?);
    let xs = open_xenstore(host.as_ref(), XsKind::Socket, None)?;
    let released = xs
        .watch("@releaseDomain", "domio-release")
        .context("watching @releaseDomain")?;
    let types = pv_backend_types(kernel_netback_loaded());
    let (quit_tx, quit_rx) = crossbeam_channel::bounded(1);
    let st = qmp::DmState::new(a.domid, a.machine == Machine::XenPv, quit_tx);
    for m in &a.monitors {
        st.add_chardev(&m.id, &format!("unix:{},server=on", m.path.display()));
    }
    // An HVM guest: the ioreq server and its machine are up (and the server enabled) before
    // libxl reads state=running and unpauses the guest into hvmloader.
    let hvm = if a.machine == Machine::XenFv {
        let cfg = hvm_config(&a, &name)?;
        let hvm = crate::hvm::Hvm::start(
            host.as_ref(),
            domid,
            &cfg,
            std::time::Duration::from_micros(20),
        )?;
        info!(guest = %name, devices = %hvm.info().devices_json(), "HVM machine");
        if let Some(c) = &hvm.info().console {
            st.add_chardev("serial0", c);
        }
        Some(hvm)
    } else {
        None
    };
    let emu_taps = open_emulated_nic_taps(&a, domid)?;
    let paths: Vec<PathBuf> = a.monitors.iter().map(|m| m.path.clone()).collect();
    let qmp = qmp::QmpServer::start(st.clone(), &paths)?;
    let svc = Service::start(
        host.clone(),
        xs.clone(),
        0,
        domid,
        &types,
        Arc::new(LogSink),
        BlkGrants::Persistent.config(),
        tap_engine_factory_toolstack_hotplug(),
    )?;
    let seen = svc.domain_exists() == Some(true);
    announce(&xs, domid, &types)?;
    info!(
        guest = %name, domid, machine = if hvm.is_some() { "xenfv" } else { "xenpv" },
        types = %types.join(","),
        qmp = %paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(","),
        "domio device model running"
    );
    let (reason, failed) = wait_for_end(&svc, seen, &signals, released, &quit_rx)?;
    info!(%reason, "device model shutting down: closing devices");
    drop(qmp);
    if let Some(h) = hvm {
        h.stop();
    }
    let code = crate::serve::stop(&svc, &reason, failed);
    drop(emu_taps);
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[&str]) -> DmArgs {
        argv::parse(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn test_pv_device_model_serves_vif_only_without_the_kernel_netback() {
        assert_eq!(pv_backend_types(true), vec!["qdisk"]);
        assert_eq!(pv_backend_types(false), vec!["qdisk", "vif"]);
    }

    #[test]
    fn test_refusals_name_what_cannot_work() {
        assert_eq!(
            refusal(&parse(&["-xen-domid", "3", "-machine", "xenpv"])),
            None
        );
        assert_eq!(
            refusal(&parse(&["-xen-domid", "3", "-machine", "xenfv"])),
            None
        );
        let r = refusal(&parse(&[
            "-xen-domid",
            "3",
            "-machine",
            "xenpv",
            "-incoming",
            "fd:5",
        ]))
        .unwrap();
        assert!(r.contains("-incoming fd:5"), "{r}");
        let r = refusal(&parse(&["-xen-domid", "3", "-machine", "xenpv,accel=tcg"])).unwrap();
        assert!(r.contains("\"tcg\""), "{r}");
    }

    /// `-xen-domid 3 -machine xenfv` and `extra`.
    fn fv(extra: &[&str]) -> DmArgs {
        let mut v = vec!["-xen-domid", "3", "-machine", "xenfv"];
        v.extend_from_slice(extra);
        parse(&v)
    }

    #[test]
    fn test_hvm_machine_from_the_command_line() {
        let c = hvm_config(&fv(&["-m", "256", "-smp", "2", "-serial", "pty"]), "g\"x").unwrap();
        assert_eq!((c.name.as_str(), c.memory_mib, c.vcpus), ("g_x", 256, 2));
        let c4 = hvm_config(&fv(&["-m", "256", "-smp", "2,maxcpus=4"]), "g").unwrap();
        assert_eq!(
            c4.vcpus, 4,
            "sized for maxvcpus: Xen gives each an ioreq slot"
        );
        assert!(
            not_emulated(&fv(&["-serial", "pty"])).is_empty(),
            "COM1 is used"
        );
        assert_eq!(c.serial, devmodel::uart::SerialSpec::Pty);
        assert_eq!(c.kernel, None);
        let a = fv(&["-m", "64", "-kernel", "/k", "-append", "console=ttyS0"]);
        let k = hvm_config(&a, "g").unwrap().kernel.unwrap();
        assert_eq!(
            (k.kernel.to_str(), k.initrd, k.cmdline.as_str()),
            (Some("/k"), None, "console=ttyS0")
        );
        let e = hvm_config(&fv(&[]), "g").unwrap_err();
        assert!(e.to_string().contains("-m is missing"), "{e}");
        let e = hvm_config(&fv(&["-m", "64", "-serial", "tcp:1:2"]), "g").unwrap_err();
        assert!(e.to_string().contains("-serial tcp:1:2"), "{e}");
    }

    #[test]
    fn test_emulated_devices_asked_for_are_listed_once() {
        let a = parse(&[
            "-xen-domid",
            "3",
            "-machine",
            "xenpv",
            "-serial",
            "pty",
            "-device",
            "rtl8139,id=nic0,netdev=net0",
            "-netdev",
            "type=tap,id=net0,ifname=vif3.0-emu",
            "-drive",
            "file=/d.img,if=ide,index=0,media=disk,format=raw",
        ]);
        let l = not_emulated(&a);
        // The drive, the NIC and the second -serial; the tap netdev is created, not skipped.
        assert_eq!(l.len(), 3, "{l:?}");
        assert!(l[0].contains("if=ide /d.img"));
        assert!(l.iter().any(|x| x == "-device rtl8139"), "{l:?}");
        assert!(!l.iter().any(|x| x.contains("netdev")), "{l:?}");
        let user = parse(&["-xen-domid", "3", "-netdev", "user,id=n1"]);
        assert_eq!(not_emulated(&user), vec!["-netdev user ".to_string()]);
    }

    #[test]
    fn test_emulated_nic_taps_take_libxl_names() {
        assert_eq!(emu_tap_devid("vif7.2-emu", 9), 2);
        assert_eq!(emu_tap_devid("mytap", 9), 9);
        assert_eq!(emu_tap_devid("vif7.x-emu", 1), 1);
        let n = |kind: &str, ifname: Option<&str>| argv::Netdev {
            kind: kind.into(),
            id: "n".into(),
            ifname: ifname.map(Into::into),
            bridge: None,
        };
        assert_eq!(
            emu_tap_name(&n("tap", Some("vif3.0-emu"))),
            Some("vif3.0-emu")
        );
        assert_eq!(emu_tap_name(&n("tap", None)), None);
        assert_eq!(emu_tap_name(&n("user", Some("x"))), None);
    }
}

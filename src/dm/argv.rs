//! The qemu-style command line libxl builds for a device model (`libxl__build_device_model_args`
//! in Xen 4.17's libxl_dm.c), parsed into what domio needs.
//!
//! Every option libxl 4.17 can pass is known here with its arity, so an option we do not
//! interpret is still skipped correctly; an option that is not known at all is refused with
//! its name (its arity is unknown, so the rest of the line could not be read). Options that
//! ask for something domio cannot do at all (migration in, a different accelerator) are
//! refused by the caller, which has the context to say why.

use std::path::PathBuf;

/// A command-line error, naming the option and the problem.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgvError {
    /// An option domio does not know.
    #[error("unknown qemu option {0} (domio's qemu-compatible command line knows the options libxl 4.17 passes; see `domio --help` for its own)")]
    Unknown(String),
    /// An option without its value.
    #[error("qemu option {0} needs a value")]
    MissingValue(String),
    /// A value that does not parse.
    #[error("qemu option {opt} {value:?}: {why}")]
    Bad {
        /// The option.
        opt: String,
        /// Its value.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// A positional argument (qemu's disk image shorthand).
    #[error("unexpected argument {0:?} (domio takes disks from xenstore or -drive)")]
    Positional(String),
    /// `-xen-domid` is missing.
    #[error("-xen-domid is missing: a device model serves one domain")]
    NoDomid,
}

/// `-machine` type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// `xenpv`: PV backends only.
    XenPv,
    /// `xenfv` (or `pc` with `accel=xen`): an HVM guest's device model.
    XenFv,
}

/// A QMP monitor: `-chardev socket,id=ID,path=PATH,server=on` with `-mon chardev=ID,mode=control`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Monitor {
    /// The chardev id (`libxl-cmd`, `libxenstat-cmd`).
    pub id: String,
    /// The unix socket to listen on.
    pub path: PathBuf,
}

/// A `-drive`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drive {
    /// `file=` (empty for an empty cdrom).
    pub file: String,
    /// `if=` (`ide`, `scsi`, `virtio`, `none`, `xen`...).
    pub interface: String,
    /// `index=`.
    pub index: Option<u32>,
    /// `media=cdrom`.
    pub cdrom: bool,
    /// `format=`.
    pub format: Option<String>,
    /// `cache=`.
    pub cache: Option<String>,
    /// `readonly=on`.
    pub readonly: bool,
    /// `id=`.
    pub id: Option<String>,
}

/// A `-device` (driver and properties).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The driver (`rtl8139`, `e1000`, `virtio-net-pci`, `xen-platform`...).
    pub driver: String,
    /// `key=value` properties, in order.
    pub props: Vec<(String, String)>,
}

impl Device {
    /// A property's value.
    pub fn prop(&self, key: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A `-netdev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netdev {
    /// `type=` (or the first word): `tap`, `user`...
    pub kind: String,
    /// `id=`.
    pub id: String,
    /// `ifname=`.
    pub ifname: Option<String>,
    /// `br=`.
    pub bridge: Option<String>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmArgs {
    /// `-xen-domid`.
    pub domid: u32,
    /// `-name` (the guest's name).
    pub name: Option<String>,
    /// `-machine`.
    pub machine: Machine,
    /// `-machine accel=` other than xen (refused by the caller).
    pub foreign_accel: Option<String>,
    /// QMP monitors, in order.
    pub monitors: Vec<Monitor>,
    /// Chardevs that are not monitors: (id, backend spec).
    pub chardevs: Vec<(String, String)>,
    /// `-m`, MiB.
    pub memory_mib: Option<u64>,
    /// `-smp` CPUs.
    pub vcpus: Option<u32>,
    /// `-smp ...,maxcpus=` (libxl passes it when maxvcpus > vcpus).
    pub max_vcpus: Option<u32>,
    /// `-serial` specs.
    pub serial: Vec<String>,
    /// `-kernel`, `-initrd`, `-append`.
    pub kernel: Option<PathBuf>,
    /// `-initrd`.
    pub initrd: Option<PathBuf>,
    /// `-append`.
    pub append: Option<String>,
    /// `-boot`.
    pub boot: Option<String>,
    /// `-drive`s.
    pub drives: Vec<Drive>,
    /// `-device`s.
    pub devices: Vec<Device>,
    /// `-netdev`s (and `-net` entries).
    pub netdevs: Vec<Netdev>,
    /// `-incoming` (restore or migration in).
    pub incoming: Option<String>,
    /// `-S`: start with vCPUs stopped.
    pub start_stopped: bool,
    /// Options accepted and ignored (logged once), e.g. `-vnc none`, `-nographic`.
    pub ignored: Vec<String>,
}

/// Options taking no value that are accepted and ignored (or read as flags below).
const FLAGS: &[&str] = &[
    "-no-shutdown",
    "-nodefaults",
    "-no-user-config",
    "-xen-attach",
    "-nographic",
    "-no-reboot",
    "-S",
    "-usb",
    "-xen-domid-restrict",
    "-enable-kvm",
    "-no-hpet",
    "-no-acpi",
    "-snapshot",
    "-daemonize",
];

/// Options taking one value (`-opt value`).
const WITH_VALUE: &[&str] = &[
    "-xen-domid",
    "-chardev",
    "-mon",
    "-name",
    "-vnc",
    "-display",
    "-m",
    "-machine",
    "-M",
    "-serial",
    "-boot",
    "-kernel",
    "-initrd",
    "-append",
    "-drive",
    "-device",
    "-netdev",
    "-net",
    "-smp",
    "-vga",
    "-k",
    "-usbdevice",
    "-soundhw",
    "-audiodev",
    "-global",
    "-incoming",
    "-runas",
    "-sandbox",
    "-spice",
    "-rtc",
    "-parallel",
    "-monitor",
    "-qmp",
    "-pidfile",
    "-acpitable",
    "-smbios",
    "-object",
    "-trace",
    "-msg",
    "-D",
    "-d",
    "-accel",
    "-L",
    "-bios",
    "-cpu",
    "-chroot",
    "-xen-shim",
    "-cdrom",
    "-fda",
    "-hda",
    "-hdb",
    "-hdc",
    "-hdd",
];

/// Splits a qemu option value `a=b,c=d` (or `word,a=b`) into pairs; `,,` is a literal comma.
/// A leading word without `=` comes back with an empty key.
pub fn split_opts(s: &str) -> Vec<(String, String)> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (String::new(), p),
        })
        .collect()
}

fn get<'a>(opts: &'a [(String, String)], key: &str) -> Option<&'a str> {
    opts.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn on(v: Option<&str>) -> bool {
    matches!(v, Some("on" | "yes" | "true" | "1" | ""))
}

fn bad(opt: &str, value: &str, why: impl Into<String>) -> ArgvError {
    ArgvError::Bad {
        opt: opt.to_string(),
        value: value.to_string(),
        why: why.into(),
    }
}

/// `-m 256`, `-m 256M`, `-m 1G`, `-m size=256`: MiB.
fn parse_memory(v: &str) -> Result<u64, ArgvError> {
    let opts = split_opts(v);
    let size = get(&opts, "size")
        .or_else(|| get(&opts, ""))
        .ok_or_else(|| bad("-m", v, "no size"))?;
    let (num, mult) = match size.chars().last() {
        Some('M' | 'm') => (&size[..size.len() - 1], 1),
        Some('G' | 'g') => (&size[..size.len() - 1], 1024),
        Some('T' | 't') => (&size[..size.len() - 1], 1024 * 1024),
        _ => (size, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad("-m", v, "not a size in MiB"))?;
    n.checked_mul(mult)
        .filter(|&m| m > 0)
        .ok_or_else(|| bad("-m", v, "out of range"))
}

/// Parses libxl's argv (without argv[0]).
pub fn parse(args: &[String]) -> Result<DmArgs, ArgvError> {
    let mut out = DmArgs {
        domid: 0,
        name: None,
        machine: Machine::XenFv,
        foreign_accel: None,
        monitors: Vec::new(),
        chardevs: Vec::new(),
        memory_mib: None,
        vcpus: None,
        max_vcpus: None,
        serial: Vec::new(),
        kernel: None,
        initrd: None,
        append: None,
        boot: None,
        drives: Vec::new(),
        devices: Vec::new(),
        netdevs: Vec::new(),
        incoming: None,
        start_stopped: false,
        ignored: Vec::new(),
    };
    let mut domid = None;
    let mut sockets: Vec<(String, PathBuf)> = Vec::new();
    let mut mon_ids: Vec<String> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let raw = &args[i];
        i += 1;
        if !raw.starts_with('-') || raw == "-" {
            return Err(ArgvError::Positional(raw.clone()));
        }
        // qemu accepts `--opt` as `-opt`.
        let opt = if raw.starts_with("--") {
            &raw[1..]
        } else {
            raw.as_str()
        };
        if FLAGS.contains(&opt) {
            match opt {
                "-S" => out.start_stopped = true,
                "-no-shutdown" | "-xen-attach" | "-nodefaults" | "-no-user-config" => {}
                _ => out.ignored.push(opt.to_string()),
            }
            continue;
        }
        if !WITH_VALUE.contains(&opt) {
            return Err(ArgvError::Unknown(raw.clone()));
        }
        let Some(value) = args.get(i) else {
            return Err(ArgvError::MissingValue(opt.to_string()));
        };
        i += 1;
        let v = value.as_str();
        match opt {
            "-xen-domid" => {
                let d: u32 = v.parse().map_err(|_| bad(opt, v, "not a domain id"))?;
                if d == 0 || d >= 0x7ff0 {
                    return Err(bad(opt, v, "not a guest domain id (1..32751)"));
                }
                domid = Some(d);
            }
            "-name" => {
                let o = split_opts(v);
                let n = get(&o, "guest").or_else(|| get(&o, "")).unwrap_or(v);
                out.name = Some(n.to_string());
            }
            "-machine" | "-M" => {
                let o = split_opts(v);
                let ty = get(&o, "type").or_else(|| get(&o, "")).unwrap_or("");
                out.machine = match ty {
                    "xenpv" => Machine::XenPv,
                    "xenfv" | "pc" | "pc-i440fx" | "" => Machine::XenFv,
                    t if t.starts_with("xenfv-") || t.starts_with("pc-i440fx-") => Machine::XenFv,
                    _ => return Err(bad(opt, v, "domio emulates the xenpv and xenfv machines")),
                };
                if let Some(a) = get(&o, "accel").filter(|a| *a != "xen") {
                    out.foreign_accel = Some(a.to_string());
                }
            }
            "-accel" => {
                let o = split_opts(v);
                let a = get(&o, "").unwrap_or(v);
                if a != "xen" {
                    out.foreign_accel = Some(a.to_string());
                }
            }
            "-chardev" => {
                let o = split_opts(v);
                let backend = get(&o, "").unwrap_or("");
                let id = get(&o, "id")
                    .ok_or_else(|| bad(opt, v, "no id="))?
                    .to_string();
                if backend == "socket" {
                    if let Some(p) = get(&o, "path") {
                        if !on(get(&o, "server")) {
                            return Err(bad(
                                opt,
                                v,
                                "domio listens (server=on); it does not connect out",
                            ));
                        }
                        sockets.push((id.clone(), PathBuf::from(p)));
                    }
                }
                out.chardevs.push((id, v.to_string()));
            }
            "-mon" => {
                let o = split_opts(v);
                let id = get(&o, "chardev").ok_or_else(|| bad(opt, v, "no chardev="))?;
                match get(&o, "mode") {
                    Some("control") => mon_ids.push(id.to_string()),
                    _ => return Err(bad(opt, v, "only QMP monitors (mode=control) are served")),
                }
            }
            "-qmp" => {
                // `-qmp unix:PATH,server=on,wait=off`
                let o = split_opts(v);
                let first = get(&o, "").unwrap_or("");
                let Some(p) = first.strip_prefix("unix:") else {
                    return Err(bad(opt, v, "only unix sockets are served"));
                };
                out.monitors.push(Monitor {
                    id: format!("qmp{}", out.monitors.len()),
                    path: PathBuf::from(p),
                });
            }
            "-m" => out.memory_mib = Some(parse_memory(v)?),
            "-smp" => {
                let o = split_opts(v);
                let n = get(&o, "cpus").or_else(|| get(&o, "")).unwrap_or(v);
                let count = |n: &str| -> Result<u32, ArgvError> {
                    let n: u32 = n.parse().map_err(|_| bad(opt, v, "not a CPU count"))?;
                    if n == 0 || n > 128 {
                        return Err(bad(opt, v, "CPU count out of range (1..128)"));
                    }
                    Ok(n)
                };
                let n = count(n)?;
                let max = match get(&o, "maxcpus") {
                    Some(m) => Some(count(m)?),
                    None => None,
                };
                if max.is_some_and(|m| m < n) {
                    return Err(bad(opt, v, "maxcpus is below the CPU count"));
                }
                out.vcpus = Some(n);
                out.max_vcpus = max;
            }
            "-serial" => out.serial.push(v.to_string()),
            "-kernel" => out.kernel = Some(PathBuf::from(v)),
            "-initrd" => out.initrd = Some(PathBuf::from(v)),
            "-append" => out.append = Some(v.to_string()),
            "-boot" => out.boot = Some(v.to_string()),
            "-incoming" => out.incoming = Some(v.to_string()),
            "-drive" => {
                let o = split_opts(v);
                let index = match get(&o, "index") {
                    Some(s) => Some(
                        s.parse()
                            .map_err(|_| bad(opt, v, "index= is not a number"))?,
                    ),
                    None => None,
                };
                out.drives.push(Drive {
                    file: get(&o, "file").unwrap_or("").to_string(),
                    interface: get(&o, "if").unwrap_or("ide").to_string(),
                    index,
                    cdrom: get(&o, "media") == Some("cdrom"),
                    format: get(&o, "format").map(str::to_string),
                    cache: get(&o, "cache").map(str::to_string),
                    readonly: on(get(&o, "readonly")),
                    id: get(&o, "id").map(str::to_string),
                });
            }
            "-device" => {
                let o = split_opts(v);
                let driver = get(&o, "driver")
                    .or_else(|| get(&o, ""))
                    .ok_or_else(|| bad(opt, v, "no driver"))?
                    .to_string();
                out.devices.push(Device {
                    driver,
                    props: o.into_iter().filter(|(k, _)| !k.is_empty()).collect(),
                });
            }
            "-netdev" | "-net" => {
                let o = split_opts(v);
                let kind = get(&o, "type").or_else(|| get(&o, "")).unwrap_or("");
                if opt == "-net" && kind == "nic" {
                    // Old-style `-net nic,...`: a NIC model, not a host side.
                    out.ignored.push(format!("{opt} {v}"));
                    continue;
                }
                out.netdevs.push(Netdev {
                    kind: kind.to_string(),
                    id: get(&o, "id")
                        .or_else(|| get(&o, "name"))
                        .unwrap_or("")
                        .to_string(),
                    ifname: get(&o, "ifname").map(str::to_string),
                    bridge: get(&o, "br").map(str::to_string),
                });
            }
            _ => out.ignored.push(format!("{opt} {v}")),
        }
    }
    out.domid = domid.ok_or(ArgvError::NoDomid)?;
    for id in mon_ids {
        let Some((_, path)) = sockets.iter().find(|(s, _)| *s == id) else {
            return Err(bad(
                "-mon",
                &id,
                "no -chardev socket with this id and a path",
            ));
        };
        out.monitors.push(Monitor {
            id,
            path: path.clone(),
        });
    }
    Ok(out)
}

/// Whether `argv` (without argv[0]) is a qemu-style device-model command line.
pub fn looks_like_qemu(args: &[String]) -> bool {
    args.first()
        .is_some_and(|a| a == "-xen-domid" || a == "--xen-domid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    /// libxl 4.17's argv for a PV guest with a qdisk disk (tests/xen-lab reference).
    fn pv_argv() -> Vec<String> {
        v(&[
            "-xen-domid",
            "3",
            "-no-shutdown",
            "-chardev",
            "socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-3,server=on,wait=off",
            "-mon",
            "chardev=libxl-cmd,mode=control",
            "-chardev",
            "socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-3,server=on,wait=off",
            "-mon",
            "chardev=libxenstat-cmd,mode=control",
            "-nodefaults",
            "-no-user-config",
            "-xen-attach",
            "-name",
            "pvqdisk",
            "-vnc",
            "none",
            "-display",
            "none",
            "-nographic",
            "-machine",
            "xenpv",
            "-m",
            "160",
        ])
    }

    #[test]
    fn test_parse_libxl_pv_argv_reads_domid_name_machine_memory_and_both_qmp_sockets() {
        let a = parse(&pv_argv()).unwrap();
        assert_eq!(a.domid, 3);
        assert_eq!(a.name.as_deref(), Some("pvqdisk"));
        assert_eq!(a.machine, Machine::XenPv);
        assert_eq!(a.memory_mib, Some(160));
        assert_eq!(
            a.monitors,
            vec![
                Monitor {
                    id: "libxl-cmd".into(),
                    path: "/var/run/xen/qmp-libxl-3".into()
                },
                Monitor {
                    id: "libxenstat-cmd".into(),
                    path: "/var/run/xen/qmp-libxenstat-3".into()
                },
            ]
        );
        assert_eq!(a.ignored, vec!["-vnc none", "-display none", "-nographic"]);
        assert!(looks_like_qemu(&pv_argv()));
    }

    #[test]
    fn test_parse_libxl_hvm_argv_reads_kernel_drive_nic_and_serial() {
        let mut args = pv_argv();
        args.truncate(11);
        args.extend(v(&[
            "-nodefaults",
            "-no-user-config",
            "-name",
            "hvm",
            "-vnc",
            "none",
            "-display",
            "none",
            "-kernel",
            "/root/vmlinuz",
            "-initrd",
            "/root/domU.cpio.gz",
            "-append",
            "console=ttyS0 console=hvc0 rdinit=/init",
            "-serial",
            "pty",
            "-boot",
            "order=cda",
            "-device",
            "rtl8139,id=nic0,netdev=net0,mac=00:16:3e:00:00:03",
            "-netdev",
            "type=tap,id=net0,ifname=vif1.0-emu,br=xenbr0,script=no,downscript=no",
            "-machine",
            "xenfv,suppress-vmdesc=on",
            "-m",
            "256",
            "-drive",
            "file=/root/disk-hvm.img,if=ide,index=0,media=disk,format=raw,cache=writeback",
        ]));
        let a = parse(&args).unwrap();
        assert_eq!(a.machine, Machine::XenFv);
        assert_eq!(a.kernel, Some(PathBuf::from("/root/vmlinuz")));
        assert_eq!(
            a.append.as_deref(),
            Some("console=ttyS0 console=hvc0 rdinit=/init")
        );
        assert_eq!(a.serial, vec!["pty"]);
        assert_eq!(a.memory_mib, Some(256));
        assert_eq!(a.drives.len(), 1);
        let d = &a.drives[0];
        assert_eq!(
            (d.file.as_str(), d.interface.as_str(), d.index),
            ("/root/disk-hvm.img", "ide", Some(0))
        );
        assert_eq!(
            (d.format.as_deref(), d.cache.as_deref(), d.cdrom),
            (Some("raw"), Some("writeback"), false)
        );
        assert_eq!(a.devices[0].driver, "rtl8139");
        assert_eq!(a.devices[0].prop("mac"), Some("00:16:3e:00:00:03"));
        assert_eq!(a.netdevs[0].ifname.as_deref(), Some("vif1.0-emu"));
        assert_eq!(a.netdevs[0].bridge.as_deref(), Some("xenbr0"));
    }

    #[test]
    fn test_parse_refuses_unknown_options_missing_values_and_bad_numbers_by_name() {
        let mut a = pv_argv();
        a.push("-frobnicate".into());
        assert_eq!(parse(&a), Err(ArgvError::Unknown("-frobnicate".into())));
        let mut a = pv_argv();
        a.push("-m".into());
        assert_eq!(parse(&a), Err(ArgvError::MissingValue("-m".into())));
        let e = parse(&v(&["-xen-domid", "0"])).unwrap_err().to_string();
        assert!(
            e.contains("-xen-domid") && e.contains("not a guest domain id"),
            "{e}"
        );
        let e = parse(&v(&["-xen-domid", "3", "-m", "lots"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("-m") && e.contains("lots"), "{e}");
        assert_eq!(parse(&v(&["-name", "x"])), Err(ArgvError::NoDomid));
        let e = parse(&v(&["-xen-domid", "3", "-machine", "q35"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("xenpv and xenfv"), "{e}");
        let e = parse(&v(&[
            "-xen-domid",
            "3",
            "-mon",
            "chardev=nope,mode=control",
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("no -chardev socket"), "{e}");
        assert!(matches!(
            parse(&v(&["-xen-domid", "3", "disk.img"])),
            Err(ArgvError::Positional(_))
        ));
    }

    #[test]
    fn test_split_opts_handles_doubled_commas_and_leading_words() {
        assert_eq!(
            split_opts("file=/a,,b.img,if=ide"),
            vec![
                ("file".into(), "/a,b.img".into()),
                ("if".into(), "ide".into())
            ]
        );
        assert_eq!(
            split_opts("rtl8139,id=nic0"),
            vec![
                (String::new(), "rtl8139".into()),
                ("id".into(), "nic0".into())
            ]
        );
    }

    #[test]
    fn test_memory_sizes_and_accelerators() {
        assert_eq!(parse_memory("512").unwrap(), 512);
        assert_eq!(parse_memory("2G").unwrap(), 2048);
        assert_eq!(parse_memory("size=256M").unwrap(), 256);
        assert!(parse_memory("0").is_err());
        let a = parse(&v(&["-xen-domid", "3", "-machine", "xenfv,accel=kvm"])).unwrap();
        assert_eq!(a.foreign_accel.as_deref(), Some("kvm"));
        let a = parse(&v(&["-xen-domid", "3", "-smp", "2,maxcpus=4"])).unwrap();
        assert_eq!((a.vcpus, a.max_vcpus), (Some(2), Some(4)));
        assert!(parse(&v(&["-xen-domid", "3", "-smp", "4,maxcpus=2"])).is_err());
        let a = parse(&v(&["--xen-domid", "4", "-S", "-incoming", "fd:3"])).unwrap();
        assert_eq!(
            (a.domid, a.start_stopped, a.incoming.as_deref()),
            (4, true, Some("fd:3"))
        );
    }
}

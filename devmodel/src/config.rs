//! The `.hvm` machine description: an xl.cfg subset (`name`, `type`, `memory`, `vcpus`,
//! `disk=[...]` in xl-disk-configuration(5) syntax, `vif=[...]` in
//! xl-network-configuration(5) syntax, `serial=`), plus `virtio_queues` (queues per
//! virtio disk), `virtio_poll_us` (how long a virtio disk's queue thread may poll its rings
//! after an interrupt; 0 turns polling off) and `xen_platform_blacklist` (driver product
//! numbers told not to load).

use crate::uart::SerialSpec;

/// `virtio_poll_us` when the file does not say. Measured on the 2-vCPU development VM (whose
/// idle vCPUs halt): a busy driver answers an interrupt in 55-100 µs at the median and up to
/// about 200 µs (the interrupt's trip through the host, the guest's wakeup, its work), so a
/// 100 µs window missed often enough to switch polling off, and 200 µs took virtio-blk from
/// 0.8x to 0.9x blkback's IOPS (docs/PERFORMANCE.md). A guest that does not answer in time
/// costs 8 windows, then one in 64 interrupts ([`crate::virtio::poll`]).
pub const DEFAULT_VIRTIO_POLL_US: u32 = 200;

/// Errors in a `.hvm` file; each names the key (and line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Syntax.
    #[error("line {line}: {why}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// A key's value is wrong.
    #[error("{key}: {why}")]
    Value {
        /// Key (with list index, e.g. `disk[1]`).
        key: String,
        /// What is wrong.
        why: String,
    },
}

fn bad(key: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError::Value {
        key: key.into(),
        why: why.into(),
    }
}

/// One value of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A quoted string.
    Str(String),
    /// A number.
    Num(i64),
    /// A list of values.
    List(Vec<Value>),
}

/// `key = value` pairs in file order.
pub fn parse_xl(text: &str) -> Result<Vec<(String, Value)>, ConfigError> {
    let chars: Vec<char> = text.chars().collect();
    let mut p = Parser {
        c: &chars,
        i: 0,
        line: 1,
    };
    let mut out = Vec::new();
    loop {
        p.skip_ws(true);
        if p.i >= chars.len() {
            return Ok(out);
        }
        let key = p.ident()?;
        p.skip_ws(false);
        if !p.eat('=') {
            return Err(p.err(format!("expected '=' after {key}")));
        }
        p.skip_ws(false);
        let v = p.value()?;
        p.skip_ws(false);
        if !(p.eat(';') || p.eat('\n') || p.i >= chars.len() || p.peek() == Some('#')) {
            return Err(p.err(format!("junk after the value of {key}")));
        }
        out.push((key, v));
    }
}

struct Parser<'a> {
    c: &'a [char],
    i: usize,
    line: usize,
}

impl Parser<'_> {
    fn err(&self, why: String) -> ConfigError {
        ConfigError::Syntax {
            line: self.line,
            why,
        }
    }
    fn peek(&self) -> Option<char> {
        self.c.get(self.i).copied()
    }
    fn eat(&mut self, ch: char) -> bool {
        if self.peek() == Some(ch) {
            self.i += 1;
            if ch == '\n' {
                self.line += 1;
            }
            true
        } else {
            false
        }
    }
    fn skip_ws(&mut self, newlines: bool) {
        while let Some(ch) = self.peek() {
            if ch == '#' {
                while self.peek().is_some_and(|c| c != '\n') {
                    self.i += 1;
                }
            } else if ch == ' '
                || ch == '\t'
                || ch == '\r'
                || (newlines && (ch == '\n' || ch == ';'))
            {
                if ch == '\n' {
                    self.line += 1;
                }
                self.i += 1;
            } else {
                break;
            }
        }
    }
    fn ident(&mut self) -> Result<String, ConfigError> {
        let s = self.i;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            self.i += 1;
        }
        if s == self.i {
            return Err(self.err("expected a key".into()));
        }
        Ok(self.c[s..self.i].iter().collect())
    }
    fn value(&mut self) -> Result<Value, ConfigError> {
        match self.peek() {
            Some(q @ ('"' | '\'')) => {
                self.i += 1;
                let s = self.i;
                while self.peek().is_some_and(|c| c != q && c != '\n') {
                    self.i += 1;
                }
                if !self.eat(q) {
                    return Err(self.err("unterminated string".into()));
                }
                Ok(Value::Str(self.c[s..self.i - 1].iter().collect()))
            }
            Some('[') => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_ws(true);
                    if self.eat(']') {
                        return Ok(Value::List(items));
                    }
                    items.push(self.value()?);
                    self.skip_ws(true);
                    if self.eat(']') {
                        return Ok(Value::List(items));
                    }
                    if !self.eat(',') {
                        return Err(self.err("expected ',' or ']' in a list".into()));
                    }
                }
            }
            Some(c) if c.is_ascii_digit() || c == '-' => {
                let s = self.i;
                self.i += 1;
                while self.peek().is_some_and(|c| c.is_ascii_alphanumeric()) {
                    self.i += 1;
                }
                let t: String = self.c[s..self.i].iter().collect();
                let n = if let Some(h) = t.strip_prefix("0x") {
                    i64::from_str_radix(h, 16).ok()
                } else {
                    t.parse().ok()
                };
                n.map(Value::Num)
                    .ok_or_else(|| self.err(format!("bad number {t}")))
            }
            _ => Err(self.err("expected a string, number or list".into())),
        }
    }
}

/// A disk (xl-disk-configuration(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Image or device path.
    pub target: String,
    /// `raw`, `qcow2` (or another name `open_image` knows); None = raw.
    pub format: Option<String>,
    /// Virtual device name (xvda, hda, sda...).
    pub vdev: String,
    /// Read-only.
    pub read_only: bool,
    /// `devtype=cdrom` or the `cdrom` flag.
    pub cdrom: bool,
}

/// Parses one DISKSPEC.
pub fn parse_disk(key: &str, spec: &str) -> Result<DiskSpec, ConfigError> {
    let mut target: Option<String> = None;
    let mut format: Option<String> = None;
    let mut vdev: Option<String> = None;
    let mut access: Option<String> = None;
    let mut cdrom = false;
    let mut rest = spec;
    let mut positional = 0usize;
    while !rest.is_empty() {
        if let Some(t) = rest.trim_start().strip_prefix("target=") {
            // target= takes the rest of the string, commas included.
            target = Some(t.to_string());
            break;
        }
        let it = match rest.find(',') {
            Some(i) => {
                let it = rest[..i].trim();
                rest = &rest[i + 1..];
                it
            }
            None => std::mem::take(&mut rest).trim(),
        };
        if let Some((k, v)) = it.split_once('=') {
            let slot = match k.trim() {
                "format" => &mut format,
                "vdev" => &mut vdev,
                "access" => &mut access,
                "devtype" => {
                    cdrom = v == "cdrom";
                    if v != "cdrom" && v != "disk" {
                        return Err(bad(key, format!("devtype={v} (disk or cdrom)")));
                    }
                    continue;
                }
                "backendtype" | "script" | "backend" | "discard" | "no-discard"
                | "direct-io-safe" | "specification" => continue,
                other => return Err(bad(key, format!("unknown disk parameter {other}="))),
            };
            if slot.is_some() {
                return Err(bad(key, format!("{k} given twice")));
            }
            *slot = Some(v.trim().to_string());
            continue;
        }
        match it {
            "cdrom" => {
                cdrom = true;
                continue;
            }
            "discard" | "no-discard" | "direct-io-safe" => continue,
            _ => {}
        }
        // Positional: target, format, vdev, access (skipping ones already named).
        loop {
            let slot = match positional {
                0 => &mut target,
                1 => &mut format,
                2 => &mut vdev,
                3 => &mut access,
                _ => return Err(bad(key, format!("too many positional parameters ({it:?})"))),
            };
            positional += 1;
            if slot.is_none() {
                if !it.is_empty() {
                    let mut v = it.to_string();
                    if positional == 1 {
                        // Deprecated "format:" prefix on the target ("raw:", "qcow2:",
                        // "phy:", "file:", "aio:", "tap:aio:"): the format slot is then taken
                        // and the next positional is the vdev.
                        let mut t = v.as_str();
                        let mut had_prefix = false;
                        while let Some((pfx, after)) = t.split_once(':') {
                            if pfx.contains('/') {
                                break;
                            }
                            match pfx {
                                "raw" | "qcow2" => format = Some(pfx.to_string()),
                                "phy" | "file" | "aio" | "tap" | "tap2" => {}
                                _ => break,
                            }
                            had_prefix = true;
                            t = after;
                        }
                        if had_prefix {
                            v = t.to_string();
                            positional = 2;
                            if format.is_none() {
                                format = Some("raw".into());
                            }
                        }
                    }
                    match positional {
                        1 => target = Some(v),
                        2 if format.is_none() => format = Some(v),
                        2 => target = Some(v),
                        3 => vdev = Some(v),
                        _ => access = Some(v),
                    }
                } else if positional == 2 && it.is_empty() {
                    // ",," leaves the format at its default.
                }
                break;
            }
        }
    }
    let target = target
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad(key, "no target"))?;
    let vdev = vdev.ok_or_else(|| bad(key, "no vdev"))?;
    let (vdev, cd2) = match vdev.split_once(':') {
        Some((v, "cdrom")) => (v.to_string(), true),
        Some(_) => return Err(bad(key, format!("bad vdev {vdev}"))),
        None => (vdev, false),
    };
    let read_only = match access.as_deref() {
        None | Some("rw") | Some("w") => false,
        Some("ro") | Some("r") => true,
        Some(a) => return Err(bad(key, format!("access={a} (r, ro, w, rw)"))),
    };
    let cdrom = cdrom || cd2;
    if !target.starts_with('/') {
        return Err(bad(key, format!("target {target} is not an absolute path")));
    }
    Ok(DiskSpec {
        target,
        format: format.filter(|f| !f.is_empty()),
        vdev,
        read_only: read_only || cdrom,
        cdrom,
    })
}

/// A NIC (xl-network-configuration(5)): the keys we honour.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VifSpec {
    /// MAC address.
    pub mac: Option<[u8; 6]>,
    /// Bridge.
    pub bridge: Option<String>,
    /// Backend interface name.
    pub vifname: Option<String>,
    /// Emulated model (ignored: the NIC is virtio-net).
    pub model: Option<String>,
    /// Every other key=value, kept for the log.
    pub other: Vec<(String, String)>,
}

/// Parses one VIFSPEC.
pub fn parse_vif(key: &str, spec: &str) -> Result<VifSpec, ConfigError> {
    let mut v = VifSpec::default();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, val) = item
            .split_once('=')
            .ok_or_else(|| bad(key, format!("{item:?} is not key=value")))?;
        match k.trim() {
            "mac" => {
                let parts: Vec<&str> = val.split(':').collect();
                let mut m = [0u8; 6];
                if parts.len() != 6 {
                    return Err(bad(key, format!("mac={val}")));
                }
                for (i, p) in parts.iter().enumerate() {
                    m[i] = u8::from_str_radix(p, 16).map_err(|_| bad(key, format!("mac={val}")))?;
                }
                v.mac = Some(m);
            }
            "bridge" => v.bridge = Some(val.to_string()),
            "vifname" => v.vifname = Some(val.to_string()),
            "model" => v.model = Some(val.to_string()),
            "type" | "ip" | "script" | "backend" | "rate" | "gatewaydev" | "mtu" | "devid"
            | "accel" | "trusted" | "untrusted" => v.other.push((k.to_string(), val.to_string())),
            other => return Err(bad(key, format!("unknown vif parameter {other}="))),
        }
    }
    Ok(v)
}

/// A machine description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    /// Guest name.
    pub name: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Disks.
    pub disks: Vec<DiskSpec>,
    /// NICs.
    pub vifs: Vec<VifSpec>,
    /// Serial console.
    pub serial: SerialSpec,
    /// Queues per virtio disk.
    pub virtio_queues: u16,
    /// Most microseconds a virtio disk's queue thread polls its rings after an interrupt
    /// (adaptive, see `virtio::poll`; 0: never).
    pub virtio_poll_us: u32,
    /// Platform-device driver product numbers that are blacklisted.
    pub platform_blacklist: Vec<u16>,
    /// A direct kernel boot through fw_cfg (qemu's `-kernel`), if asked for.
    pub kernel: Option<KernelBoot>,
}

/// A direct kernel boot: the files, the command line, and the option ROM SeaBIOS runs to
/// load them (QEMU's `linuxboot.bin` protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot {
    /// The bzImage.
    pub kernel: std::path::PathBuf,
    /// The initrd.
    pub initrd: Option<std::path::PathBuf>,
    /// The command line.
    pub cmdline: String,
    /// The linuxboot option ROM.
    pub rom: std::path::PathBuf,
}

fn want_str(key: &str, v: &Value) -> Result<String, ConfigError> {
    match v {
        Value::Str(s) => Ok(s.clone()),
        _ => Err(bad(key, "expected a quoted string")),
    }
}

fn want_num(key: &str, v: &Value, min: i64, max: i64) -> Result<i64, ConfigError> {
    match v {
        Value::Num(n) if (min..=max).contains(n) => Ok(*n),
        Value::Num(n) => Err(bad(key, format!("{n} is outside {min}..={max}"))),
        _ => Err(bad(key, "expected a number")),
    }
}

fn want_list<'a>(key: &str, v: &'a Value) -> Result<&'a [Value], ConfigError> {
    match v {
        Value::List(l) => Ok(l),
        _ => Err(bad(key, "expected a list [ ... ]")),
    }
}

impl MachineConfig {
    /// Parses a `.hvm` file's text.
    pub fn parse(text: &str) -> Result<MachineConfig, ConfigError> {
        let mut c = MachineConfig {
            name: String::new(),
            memory_mib: 0,
            vcpus: 1,
            disks: Vec::new(),
            vifs: Vec::new(),
            serial: SerialSpec::None,
            virtio_queues: 1,
            virtio_poll_us: DEFAULT_VIRTIO_POLL_US,
            platform_blacklist: Vec::new(),
            kernel: None,
        };
        let mut ty = None;
        for (k, v) in parse_xl(text)? {
            match k.as_str() {
                "name" => c.name = want_str(&k, &v)?,
                "type" | "builder" => ty = Some(want_str(&k, &v)?),
                "memory" => c.memory_mib = want_num(&k, &v, 1, 1 << 24)? as u64,
                "maxmem"
                | "kernel"
                | "boot"
                | "on_poweroff"
                | "on_reboot"
                | "on_crash"
                | "device_model_version"
                | "device_model_override"
                | "uuid"
                | "firmware"
                | "bios" => {}
                "vcpus" => c.vcpus = want_num(&k, &v, 1, 4096)? as u32,
                "virtio_queues" => c.virtio_queues = want_num(&k, &v, 1, 16)? as u16,
                "virtio_poll_us" => c.virtio_poll_us = want_num(&k, &v, 0, 100_000)? as u32,
                "serial" => {
                    let s = match &v {
                        Value::List(l) if l.len() == 1 => want_str(&k, &l[0])?,
                        Value::List(_) => {
                            return Err(bad(&k, "only one serial port (COM1) is emulated"))
                        }
                        other => want_str(&k, other)?,
                    };
                    c.serial = SerialSpec::parse(&s).map_err(|e| bad(&k, e.to_string()))?;
                }
                "disk" => {
                    for (i, d) in want_list(&k, &v)?.iter().enumerate() {
                        let key = format!("disk[{i}]");
                        c.disks.push(parse_disk(&key, &want_str(&key, d)?)?);
                    }
                }
                "vif" => {
                    for (i, d) in want_list(&k, &v)?.iter().enumerate() {
                        let key = format!("vif[{i}]");
                        c.vifs.push(parse_vif(&key, &want_str(&key, d)?)?);
                    }
                }
                "xen_platform_blacklist" => {
                    for (i, n) in want_list(&k, &v)?.iter().enumerate() {
                        c.platform_blacklist
                            .push(want_num(&format!("{k}[{i}]"), n, 0, 0xffff)? as u16);
                    }
                }
                other => return Err(bad(other, "unknown key")),
            }
        }
        match ty.as_deref() {
            Some("hvm") => {}
            Some(t) => {
                return Err(bad(
                    "type",
                    format!("{t:?}: a .hvm machine needs type=\"hvm\""),
                ))
            }
            None => return Err(bad("type", "missing (type=\"hvm\")")),
        }
        if c.name.is_empty() {
            return Err(bad("name", "missing"));
        }
        if c.memory_mib == 0 {
            return Err(bad("memory", "missing"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in c.disks.iter().enumerate() {
            if !seen.insert(d.vdev.clone()) {
                return Err(bad(
                    format!("disk[{i}]"),
                    format!("vdev {} used twice", d.vdev),
                ));
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs_from_the_man_page_agree() {
        let want = DiskSpec {
            target: "/dev/vg/guest-volume".into(),
            format: Some("raw".into()),
            vdev: "hda".into(),
            read_only: false,
            cdrom: false,
        };
        for s in [
            "/dev/vg/guest-volume,raw,hda,rw",
            "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
            "raw:/dev/vg/guest-volume,hda,w",
        ] {
            assert_eq!(parse_disk("disk[0]", s).unwrap(), want, "{s}");
        }
        let d = parse_disk("disk[0]", "/dev/vg/guest-volume,,hda").unwrap();
        assert_eq!((d.format, d.vdev.as_str()), (None, "hda"));
        let d = parse_disk("disk[0]", "/root/image.iso,,hdc,cdrom").unwrap();
        assert!(d.cdrom && d.read_only);
        let d = parse_disk("disk[0]", "qcow2:/i/a.qcow2,xvda,w").unwrap();
        assert_eq!(d.format.as_deref(), Some("qcow2"));
    }

    #[test]
    fn bad_keys_are_named() {
        let e =
            MachineConfig::parse("name='a'\ntype='hvm'\nmemory=64\nfrobnicate=1\n").unwrap_err();
        assert!(e.to_string().starts_with("frobnicate"), "{e}");
        let e =
            MachineConfig::parse("name='a'\ntype='hvm'\nmemory=64\ndisk=['/x,raw']\n").unwrap_err();
        assert!(e.to_string().starts_with("disk[0]"), "{e}");
        let c = MachineConfig::parse("name = \"g\"\ntype = \"hvm\"\nmemory = 128\nvcpus = 2\ndisk = [ '/d.img,raw,xvda,rw',\n  'qcow2:/e.qcow2,xvdb,r' ]\nserial = 'pty'\nvif = ['mac=00:16:3e:00:00:01,bridge=br0']\n").unwrap();
        assert_eq!((c.memory_mib, c.vcpus, c.disks.len()), (128, 2, 2));
        assert!(c.disks[1].read_only);
        assert_eq!(c.vifs[0].bridge.as_deref(), Some("br0"));
    }

    #[test]
    fn virtio_poll_us_defaults_parses_and_names_a_bad_value() {
        let base = "name='a'\ntype='hvm'\nmemory=64\n";
        let c = MachineConfig::parse(base).unwrap();
        assert_eq!(c.virtio_poll_us, DEFAULT_VIRTIO_POLL_US);
        let c = MachineConfig::parse(&format!("{base}virtio_poll_us = 0\n")).unwrap();
        assert_eq!(c.virtio_poll_us, 0);
        for bad in ["-1", "100001", "'fast'"] {
            let e = MachineConfig::parse(&format!("{base}virtio_poll_us = {bad}\n")).unwrap_err();
            assert!(e.to_string().starts_with("virtio_poll_us"), "{bad}: {e}");
        }
    }
}

//! Negotiation with the toolstack and the frontend (io/netif.h's xenstore keys, as Linux
//! xen-netback's `netback_probe`, `connect` and `read_xenbus_vif_flags`).
//!
//! Probe reads the toolstack's `mac`, `bridge`, `script`, `rate`, `ip` and `mtu` and
//! advertises what we do. Connect reads what the frontend chose, every value strictly parsed
//! and bounded by what we advertised: a bad value fails the connect (an `error` node naming
//! the key, no Connected).

use std::time::Duration;

use xen::GrantRef;
use xenbus::backend::{DeviceCtx, DriverError};

/// Highest event-channel port of the FIFO ABI.
const MAX_PORT: u32 = (1 << 17) - 1;
/// Most queues a vif may have (the vif thread polls them all).
pub const MAX_QUEUES: u32 = 16;
/// Largest `xdp-headroom` we accept (the first RX slot keeps room for a full-size header).
pub const MAX_XDP_HEADROOM: u32 = 2048;

/// The toolstack's description of a vif.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VifParams {
    /// Backend type (`vif` or `qnic`).
    pub backend_type: String,
    /// Guest.
    pub domid: u32,
    /// Device id.
    pub devid: u32,
    /// The guest's MAC (`mac`).
    pub mac: [u8; 6],
    /// Bridge to attach the tap to (`bridge`).
    pub bridge: Option<String>,
    /// Hotplug script (`script`).
    pub script: Option<String>,
    /// `rate`: bytes per interval.
    pub rate: Option<Rate>,
    /// `ip`: the guest's addresses (space-separated), for the hotplug script.
    pub ip: Option<String>,
    /// `mtu` (default 1500).
    pub mtu: u32,
    /// The backend path (for scripts' XENBUS_PATH).
    pub backend_path: String,
}

impl VifParams {
    /// The default tap name, `vif<domid>.<devid>` as Xen's scripts expect.
    pub fn tap_name(&self) -> String {
        format!("vif{}.{}", self.domid, self.devid)
    }
}

/// A credit-based rate: `bytes` per `interval` (Linux netback's credit_bytes / credit_usec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Credit per interval.
    pub bytes: u64,
    /// The interval.
    pub interval: Duration,
}

impl Rate {
    /// Parses `bytes,usec` as libxl writes it. Zero bytes or a zero interval: unlimited.
    pub fn parse(s: &str) -> Result<Option<Rate>, String> {
        let (b, u) = s
            .trim()
            .split_once(',')
            .ok_or_else(|| format!("rate {s:?} is not bytes,usec"))?;
        let bytes: u64 = b
            .trim()
            .parse()
            .map_err(|_| format!("rate bytes {b:?} is not a number"))?;
        let usec: u64 = u
            .trim()
            .parse()
            .map_err(|_| format!("rate interval {u:?} is not a number"))?;
        if usec > u64::from(u32::MAX) {
            return Err(format!(
                "rate interval {usec} us is longer than libxl allows"
            ));
        }
        if bytes == 0 || usec == 0 {
            return Ok(None);
        }
        Ok(Some(Rate {
            bytes,
            interval: Duration::from_micros(usec),
        }))
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn failed(ctx: &DeviceCtx, what: String) -> DriverError {
    DriverError::Failed(format!(
        "domain {} vif {}: {what}",
        ctx.frontend_domid(),
        ctx.devid()
    ))
}

/// Reads the toolstack's backend keys.
pub(crate) fn read_params(ctx: &DeviceCtx) -> Result<VifParams, DriverError> {
    let mac_s = ctx
        .read_backend("mac")?
        .ok_or_else(|| failed(ctx, "backend node mac is missing".into()))?;
    let mac = parse_mac(&mac_s).ok_or_else(|| failed(ctx, format!("mac {mac_s:?} is invalid")))?;
    let nonempty = |v: Option<String>| v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
    let rate = match ctx.read_backend("rate")? {
        None => None,
        Some(r) => Rate::parse(&r).map_err(|e| failed(ctx, e))?,
    };
    let mtu = match ctx.read_backend("mtu")? {
        None => 1500,
        Some(m) => m
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|m| (68..=65535).contains(m))
            .ok_or_else(|| failed(ctx, format!("mtu {m:?} is not in 68..=65535")))?,
    };
    Ok(VifParams {
        backend_type: ctx.backend_type().to_owned(),
        domid: ctx.frontend_domid(),
        devid: ctx.devid(),
        mac,
        bridge: nonempty(ctx.read_backend("bridge")?),
        script: nonempty(ctx.read_backend("script")?),
        rate,
        ip: nonempty(ctx.read_backend("ip")?),
        mtu,
        backend_path: ctx.backend_path().to_owned(),
    })
}

/// Writes the features (one transaction), as Linux's `netback_probe` does.
pub(crate) fn advertise(ctx: &DeviceCtx, max_queues: u32) -> Result<(), DriverError> {
    let q = max_queues.clamp(1, MAX_QUEUES).to_string();
    ctx.write_backend(&[
        ("feature-sg", "1"),
        ("feature-gso-tcpv4", "1"),
        ("feature-gso-tcpv6", "1"),
        ("feature-ipv6-csum-offload", "1"),
        ("feature-rx-copy", "1"),
        ("feature-rx-flip", "0"),
        ("feature-multicast-control", "1"),
        ("feature-dynamic-multicast-control", "1"),
        ("feature-split-event-channels", "1"),
        ("multi-queue-max-queues", &q),
        ("feature-ctrl-ring", "1"),
        ("feature-xdp-headroom", "1"),
    ])?;
    Ok(())
}

/// One queue's rings as the frontend published them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRings {
    /// `tx-ring-ref`.
    pub tx_ref: GrantRef,
    /// `rx-ring-ref`.
    pub rx_ref: GrantRef,
    /// `event-channel-tx` (or the shared `event-channel`).
    pub tx_port: u32,
    /// `event-channel-rx` (equal to `tx_port` when not split).
    pub rx_port: u32,
}

/// What the frontend chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendChoice {
    /// One entry per queue.
    pub queues: Vec<QueueRings>,
    /// `feature-sg`.
    pub sg: bool,
    /// `feature-gso-tcpv4`.
    pub gso_tcpv4: bool,
    /// `feature-gso-tcpv6`.
    pub gso_tcpv6: bool,
    /// Checksum offload on RX (not `feature-no-csum-offload`).
    pub csum: bool,
    /// `feature-ipv6-csum-offload`.
    pub ipv6_csum: bool,
    /// `request-multicast-control`.
    pub multicast_control: bool,
    /// `ctrl-ring-ref` and `event-channel-ctrl`.
    pub ctrl: Option<(GrantRef, u32)>,
    /// `xdp-headroom`.
    pub xdp_headroom: u16,
}

fn ports(ctx: &DeviceCtx, prefix: &str) -> Result<(u32, u32), DriverError> {
    let tx = ctx.frontend_u32(&format!("{prefix}event-channel-tx"), 1..=MAX_PORT)?;
    let rx = ctx.frontend_u32(&format!("{prefix}event-channel-rx"), 1..=MAX_PORT)?;
    match (tx, rx) {
        (Some(t), Some(r)) => Ok((t, r)),
        (None, None) => {
            let p = ctx.frontend_required_u32(&format!("{prefix}event-channel"), 1..=MAX_PORT)?;
            Ok((p, p))
        }
        _ => Err(failed(
            ctx,
            format!("{prefix}event-channel-tx and -rx must be given together"),
        )),
    }
}

/// Reads the frontend's keys, each bounded by what we advertised.
pub(crate) fn read_frontend(
    ctx: &DeviceCtx,
    max_queues: u32,
) -> Result<FrontendChoice, DriverError> {
    let nq = ctx
        .frontend_u32(
            "multi-queue-num-queues",
            1..=max_queues.clamp(1, MAX_QUEUES),
        )?
        .unwrap_or(1);
    if ctx.frontend_u32("request-rx-copy", 0..=1)? != Some(1) {
        return Err(failed(
            ctx,
            "frontend must set request-rx-copy = 1 (page flipping is not supported)".into(),
        ));
    }
    if !ctx.frontend_flag("feature-rx-notify")? {
        return Err(failed(
            ctx,
            "feature-rx-notify is mandatory (as in Linux netback)".into(),
        ));
    }
    let mut queues = Vec::with_capacity(nq as usize);
    for q in 0..nq {
        let prefix = if nq > 1 {
            format!("queue-{q}/")
        } else {
            String::new()
        };
        let tx_ref = ctx.frontend_required_u32(&format!("{prefix}tx-ring-ref"), 0..=u32::MAX)?;
        let rx_ref = ctx.frontend_required_u32(&format!("{prefix}rx-ring-ref"), 0..=u32::MAX)?;
        let (tx_port, rx_port) = ports(ctx, &prefix)?;
        queues.push(QueueRings {
            tx_ref,
            rx_ref,
            tx_port,
            rx_port,
        });
    }
    let ctrl_ref = ctx.frontend_u32("ctrl-ring-ref", 0..=u32::MAX)?;
    let ctrl = match ctrl_ref {
        None => None,
        Some(r) => Some((
            r,
            ctx.frontend_required_u32("event-channel-ctrl", 1..=MAX_PORT)?,
        )),
    };
    let xdp_headroom = ctx
        .frontend_u32("xdp-headroom", 0..=MAX_XDP_HEADROOM)?
        .unwrap_or(0) as u16;
    Ok(FrontendChoice {
        queues,
        sg: ctx.frontend_flag("feature-sg")?,
        gso_tcpv4: ctx.frontend_flag("feature-gso-tcpv4")?,
        gso_tcpv6: ctx.frontend_flag("feature-gso-tcpv6")?,
        csum: !ctx.frontend_flag("feature-no-csum-offload")?,
        ipv6_csum: ctx.frontend_flag("feature-ipv6-csum-offload")?,
        multicast_control: ctx.frontend_flag("request-multicast-control")?,
        ctrl,
        xdp_headroom,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_mac_strict() {
        assert_eq!(
            parse_mac("00:16:3e:01:02:0a"),
            Some([0, 0x16, 0x3e, 1, 2, 0xa])
        );
        assert_eq!(parse_mac("00:16:3e:01:02"), None);
        assert_eq!(parse_mac("00:16:3e:01:02:0a:00"), None);
        assert_eq!(parse_mac("0:16:3e:01:02:0a"), None);
    }

    #[test]
    fn test_rate_parse() {
        assert_eq!(
            Rate::parse("125000,50000").unwrap(),
            Some(Rate {
                bytes: 125000,
                interval: Duration::from_micros(50000)
            })
        );
        assert_eq!(Rate::parse("0,50000").unwrap(), None);
        assert!(Rate::parse("fast").is_err());
    }
}

//! Negotiation with the toolstack and the frontend (io/blkif.h's xenstore keys).
//!
//! Probe reads the toolstack's `params`, `mode`, `device-type` and `discard-enable` and
//! advertises what we do. Connect reads what the frontend chose, every value bounded by what we
//! advertised (THREATS "Rule for domio"): a `ring-page-order` above ours or a
//! `multi-queue-num-queues` above ours fails the connect (an `error` node, no Connected).

use xen::abi::blkif::*;
use xen::GrantRef;
use xenbus::backend::{DeviceCtx, DriverError};

use super::engine::EngineInfo;
use super::request::{DiskLimits, MAX_INDIRECT_SEGMENTS};

/// The largest ring we map: 2^4 = 16 pages (`xen::abi::ring::MAX_RING_PAGES`).
pub const MAX_RING_PAGE_ORDER: u32 = xen::abi::ring::MAX_RING_PAGES.trailing_zeros();
use super::{BlkConfig, GrantMode, Protocol};

/// The toolstack's description of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskParams {
    /// The image format from `params` (`qcow2:/path`), if one was given.
    pub format: Option<String>,
    /// The image or device path (or, for the `null` format, a size such as `1G`).
    pub path: String,
    /// Open read-only.
    pub read_only: bool,
    /// A CD-ROM drive.
    pub cdrom: bool,
    /// The toolstack allows discard (`discard-enable`, default yes).
    pub discard_enable: bool,
    /// Which queue the engine is for (0 at probe; one engine per queue).
    pub queue: u32,
}

/// Formats whose prefix `params` may carry (libxl's qdisk writes `aio:`, `qcow2:`, ...).
const FORMATS: &[&str] = &[
    "raw",
    "aio",
    "file",
    "phy",
    "host_device",
    "qcow",
    "qcow2",
    "vhd",
    "vpc",
    "null",
];

impl DiskParams {
    /// Splits `params` = `[format:]path`. A prefix that is not a known format stays part of
    /// the path (paths may contain colons).
    pub fn parse_params(params: &str) -> (Option<String>, String) {
        if let Some((pre, rest)) = params.split_once(':') {
            if FORMATS.contains(&pre) {
                return (Some(pre.to_owned()), rest.to_owned());
            }
        }
        (None, params.to_owned())
    }

    /// Whether one engine per queue may open the same image (false for formats with
    /// metadata caches, whose engines must not be opened twice).
    pub fn multi_open_safe(&self) -> bool {
        !matches!(
            self.format.as_deref(),
            Some("qcow" | "qcow2" | "vhd" | "vpc")
        )
    }
}

fn failed(ctx: &DeviceCtx, what: String) -> DriverError {
    DriverError::Failed(format!(
        "domain {} vbd {}: {what}",
        ctx.frontend_domid(),
        ctx.devid()
    ))
}

/// Reads the toolstack's backend keys.
pub(crate) fn read_params(ctx: &DeviceCtx) -> Result<DiskParams, DriverError> {
    let params = ctx
        .read_backend("params")?
        .ok_or_else(|| failed(ctx, "backend node params is missing".into()))?;
    let (format, path) = DiskParams::parse_params(params.trim());
    if path.is_empty() {
        return Err(failed(ctx, "params names no image (empty drive)".into()));
    }
    let mode = ctx
        .read_backend("mode")?
        .ok_or_else(|| failed(ctx, "backend node mode is missing".into()))?;
    let cdrom = ctx.read_backend("device-type")?.as_deref() == Some("cdrom");
    let discard_enable = !matches!(
        ctx.read_backend("discard-enable")?.as_deref(),
        Some("0") | Some("false")
    );
    Ok(DiskParams {
        format,
        path,
        read_only: !mode.contains('w') || cdrom,
        cdrom,
        discard_enable,
        queue: 0,
    })
}

/// What probe advertised; connect bounds the frontend by it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Advertised {
    pub limits: DiskLimits,
    pub max_queues: u32,
    pub max_ring_page_order: u32,
    pub persistent: bool,
}

/// Writes the features and the disk's geometry (one transaction).
pub(crate) fn advertise(
    ctx: &DeviceCtx,
    params: &DiskParams,
    info: &EngineInfo,
    cfg: &BlkConfig,
) -> Result<Advertised, DriverError> {
    let read_only = params.read_only || info.read_only;
    let discard = info.discard.is_some() && params.discard_enable && !read_only;
    let secure_discard = discard && info.secure_discard;
    let max_queues = if params.multi_open_safe() {
        cfg.max_queues.max(1)
    } else {
        1
    };
    let sectors = info.capacity / BLKIF_SECTOR_SIZE;
    // Never advertise more than the ring code and the request parser handle.
    let max_order = cfg.max_ring_page_order.min(MAX_RING_PAGE_ORDER);
    let max_indirect = cfg.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS);
    // Persistent grants are a mapping cache: meaningless when data is grant-copied.
    let persistent = cfg.persistent_grants && cfg.grant_mode == GrantMode::Map;
    let mut vinfo = 0;
    if read_only {
        vinfo |= VDISK_READONLY;
    }
    if params.cdrom {
        vinfo |= VDISK_CDROM | VDISK_REMOVABLE;
    }
    let s = |v: u64| v.to_string();
    let kv: Vec<(&str, String)> = vec![
        ("feature-flush-cache", s(1)),
        ("feature-barrier", s(1)),
        ("feature-persistent", s(u64::from(persistent))),
        ("feature-max-indirect-segments", s(u64::from(max_indirect))),
        ("multi-queue-max-queues", s(u64::from(max_queues))),
        ("max-ring-page-order", s(u64::from(max_order))),
        ("sectors", s(sectors)),
        ("sector-size", s(u64::from(info.logical_sector))),
        ("physical-sector-size", s(u64::from(info.physical_sector))),
        ("info", s(u64::from(vinfo))),
        ("feature-discard", s(u64::from(discard))),
    ];
    let mut kv = kv;
    if discard {
        let gran = info.discard.unwrap_or(0).max(info.logical_sector);
        kv.push(("discard-granularity", s(u64::from(gran))));
        kv.push(("discard-alignment", s(0)));
        kv.push(("discard-secure", s(u64::from(secure_discard))));
    }
    let refs: Vec<(&str, &str)> = kv.iter().map(|(k, v)| (*k, v.as_str())).collect();
    ctx.write_backend(&refs)?;
    Ok(Advertised {
        limits: DiskLimits {
            sectors,
            read_only,
            discard,
            secure_discard,
            barrier: true,
            flush: true,
            max_indirect_segments: max_indirect,
        },
        max_queues,
        max_ring_page_order: max_order,
        persistent,
    })
}

/// One queue's ring as the frontend published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueRing {
    pub ring_refs: Vec<GrantRef>,
    pub port: u32,
}

/// What the frontend chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FrontendChoice {
    pub protocol: Protocol,
    pub persistent: bool,
    pub queues: Vec<QueueRing>,
}

/// Highest event-channel port of the FIFO ABI.
const MAX_PORT: u32 = (1 << 17) - 1;

/// Reads the frontend's keys, each bounded by what we advertised.
pub(crate) fn read_frontend(
    ctx: &DeviceCtx,
    adv: &Advertised,
) -> Result<FrontendChoice, DriverError> {
    let protocol = match ctx.frontend_choice(
        "protocol",
        &[XEN_IO_PROTO_ABI_X86_32, XEN_IO_PROTO_ABI_X86_64],
    )? {
        None => Protocol::Native,
        Some(XEN_IO_PROTO_ABI_X86_32) => Protocol::X86_32,
        Some(_) => Protocol::X86_64,
    };
    let order = ctx.frontend_u32("ring-page-order", 0..=adv.max_ring_page_order)?;
    let nq = ctx
        .frontend_u32("multi-queue-num-queues", 1..=adv.max_queues)?
        .unwrap_or(1);
    let persistent = adv.persistent && ctx.frontend_flag("feature-persistent")?;
    let mut queues = Vec::with_capacity(nq as usize);
    for q in 0..nq {
        let prefix = if nq > 1 {
            format!("queue-{q}/")
        } else {
            String::new()
        };
        let ring_refs = match order {
            None => vec![ctx.frontend_required_u32(&format!("{prefix}ring-ref"), 0..=u32::MAX)?],
            Some(o) => (0..(1u32 << o))
                .map(|i| ctx.frontend_required_u32(&format!("{prefix}ring-ref{i}"), 0..=u32::MAX))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let port = ctx.frontend_required_u32(&format!("{prefix}event-channel"), 1..=MAX_PORT)?;
        queues.push(QueueRing { ring_refs, port });
    }
    Ok(FrontendChoice {
        protocol,
        persistent,
        queues,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_params_known_prefix_splits_unknown_kept() {
        assert_eq!(
            DiskParams::parse_params("qcow2:/img/a.qcow2"),
            (Some("qcow2".into()), "/img/a.qcow2".into())
        );
        assert_eq!(
            DiskParams::parse_params("/dev/disk/by-id/x:y"),
            (None, "/dev/disk/by-id/x:y".into())
        );
        assert_eq!(
            DiskParams::parse_params("weird:/p"),
            (None, "weird:/p".into())
        );
    }
}

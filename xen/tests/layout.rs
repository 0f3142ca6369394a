//! Layout test: every ABI mirror in `xen::abi` and `xen::linux::uapi` against the C headers.
//!
//! Three C builds (see `tests/layout/`):
//! * `xen_public.c`, native: Xen's public headers from Debian's libxen-dev, compiled and run;
//! * `xen_public.c` with `-m32`, compiled to assembly only: the blkif layout a 32-bit frontend
//!   uses (the x86_32-abi), read from the assembly text;
//! * `linux_uapi.c`, native: the kernel's /usr/include/xen/{evtchn,gntdev,privcmd}.h.
//!
//! Each prints `name value` pairs; the test compares each with the Rust `size_of`,
//! `offset_of!` or constant, fails listing every mismatch, and also fails if the C side printed
//! a value that no Rust check looked at (so nothing is silently left unchecked). Missing
//! headers fail the test with the package to install: it never skips.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use xen::abi::blkif::*;
use xen::abi::dm_op::*;
use xen::abi::event_channel::*;
use xen::abi::grant_table::*;
use xen::abi::ioreq::*;
use xen::abi::netif::*;
use xen::abi::ring::*;
use xen::abi::xs_wire::*;
use xen::linux::uapi::*;
use xen::ring::ring_size_of;

const LAYOUT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/layout");
const INSTALL_HINT: &str =
    "install the headers: `apt-get install -y libxen-dev linux-libc-dev gcc` \
     (Debian: libxen-dev has Xen's public headers, linux-libc-dev the kernel's xen uapi)";

fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".to_string())
}

/// The headers the probes include, relative to the include root.
const HEADERS: [&str; 10] = [
    "xen/xen.h",
    "xen/io/ring.h",
    "xen/io/blkif.h",
    "xen/io/netif.h",
    "xen/io/xs_wire.h",
    "xen/hvm/ioreq.h",
    "xen/hvm/dm_op.h",
    "xen/evtchn.h",
    "xen/gntdev.h",
    "xen/privcmd.h",
];

/// Why the probes cannot be built with headers under `root`, if they cannot.
fn header_problem(root: &Path) -> Option<String> {
    let missing: Vec<String> = HEADERS
        .iter()
        .map(|h| root.join(h))
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    (!missing.is_empty()).then(|| format!("missing C headers {missing:?}: {INSTALL_HINT}"))
}

fn require_headers() {
    if let Some(problem) = header_problem(Path::new("/usr/include")) {
        panic!("{problem}");
    }
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({cmd:?}): {e}; {INSTALL_HINT}"));
    assert!(
        out.status.success(),
        "{what} failed ({cmd:?}):\n{}\n{}\n{INSTALL_HINT}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn out_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xen-layout");
    std::fs::create_dir_all(&d).expect("create tmp dir");
    d
}

fn parse_lines(text: &str) -> BTreeMap<String, i128> {
    text.lines()
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Compiles and runs a native probe program; returns its values.
fn native(source: &str, extra: &[&str]) -> BTreeMap<String, i128> {
    let exe = out_dir().join(source.trim_end_matches(".c"));
    run(
        Command::new(cc())
            .args(["-std=gnu11", "-Wall", "-Werror", "-D__XEN_TOOLS__"])
            .args(extra)
            .arg(format!("-I{LAYOUT_DIR}"))
            .arg("-o")
            .arg(&exe)
            .arg(Path::new(LAYOUT_DIR).join(source)),
        &format!("compiling {source}"),
    );
    parse_lines(&run(&mut Command::new(&exe), &format!("running {source}")))
}

/// Compiles a probe for i386 to assembly and reads the `@@name value@@` markers.
fn i386(source: &str) -> BTreeMap<String, i128> {
    let asm = run(
        Command::new(cc())
            .args([
                "-std=gnu11",
                "-m32",
                "-ffreestanding",
                "-DLAYOUT_ASM",
                "-D__XEN_TOOLS__",
                "-S",
            ])
            .arg(format!("-I{LAYOUT_DIR}"))
            .args(["-o", "-"])
            .arg(Path::new(LAYOUT_DIR).join(source)),
        &format!("compiling {source} for i386"),
    );
    asm.split("@@")
        .skip(1)
        .step_by(2)
        .filter_map(|m| {
            let (name, value) = m.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Compares Rust values with C values by name and collects every problem.
struct Checker {
    label: &'static str,
    c: BTreeMap<String, i128>,
    seen: std::collections::BTreeSet<String>,
    errors: Vec<String>,
}

impl Checker {
    fn new(label: &'static str, c: BTreeMap<String, i128>) -> Self {
        assert!(!c.is_empty(), "{label}: the C probe printed nothing");
        Checker {
            label,
            c,
            seen: Default::default(),
            errors: Vec::new(),
        }
    }

    fn check(&mut self, name: &str, rust: i128) {
        self.seen.insert(name.to_string());
        match self.c.get(name) {
            None => self.errors.push(format!(
                "{}: `{name}`: not printed by the C probe",
                self.label
            )),
            Some(&c) if c != rust => self
                .errors
                .push(format!("{}: `{name}`: C {c} != Rust {rust}", self.label)),
            Some(_) => {}
        }
    }

    fn finish(mut self) -> Vec<String> {
        for name in self.c.keys() {
            if !self.seen.contains(name) {
                self.errors.push(format!(
                    "{}: `{name}`: printed by C but not checked in Rust",
                    self.label
                ));
            }
        }
        self.errors
    }
}

macro_rules! size {
    ($ch:expr, $c:literal, $t:ty) => {
        $ch.check(concat!("sizeof ", $c), size_of::<$t>() as i128)
    };
}
macro_rules! off {
    ($ch:expr, $c:literal, $cf:literal, $t:ty, $f:ident) => {
        $ch.check(
            concat!("offsetof ", $c, " ", $cf),
            offset_of!($t, $f) as i128,
        )
    };
}
macro_rules! konst {
    ($ch:expr, $c:literal, $v:expr) => {
        $ch.check($c, ($v) as i128)
    };
}

/// The blkif checks shared by the native and the i386 build, against the given Rust types.
macro_rules! blkif_checks {
    ($ch:expr, $req:ty, $discard:ty, $indirect:ty, $rsp:ty) => {{
        let ch = $ch;
        size!(ch, "struct blkif_request_segment", BlkifRequestSegment);
        off!(
            ch,
            "struct blkif_request_segment",
            "first_sect",
            BlkifRequestSegment,
            first_sect
        );
        off!(
            ch,
            "struct blkif_request_segment",
            "last_sect",
            BlkifRequestSegment,
            last_sect
        );
        size!(ch, "struct blkif_request", $req);
        off!(ch, "struct blkif_request", "nr_segments", $req, nr_segments);
        off!(ch, "struct blkif_request", "handle", $req, handle);
        off!(ch, "struct blkif_request", "id", $req, id);
        off!(
            ch,
            "struct blkif_request",
            "sector_number",
            $req,
            sector_number
        );
        off!(ch, "struct blkif_request", "seg", $req, seg);
        size!(ch, "struct blkif_request_discard", $discard);
        off!(ch, "struct blkif_request_discard", "flag", $discard, flag);
        off!(
            ch,
            "struct blkif_request_discard",
            "handle",
            $discard,
            handle
        );
        off!(ch, "struct blkif_request_discard", "id", $discard, id);
        off!(
            ch,
            "struct blkif_request_discard",
            "sector_number",
            $discard,
            sector_number
        );
        off!(
            ch,
            "struct blkif_request_discard",
            "nr_sectors",
            $discard,
            nr_sectors
        );
        size!(ch, "struct blkif_request_indirect", $indirect);
        off!(
            ch,
            "struct blkif_request_indirect",
            "indirect_op",
            $indirect,
            indirect_op
        );
        off!(
            ch,
            "struct blkif_request_indirect",
            "nr_segments",
            $indirect,
            nr_segments
        );
        off!(ch, "struct blkif_request_indirect", "id", $indirect, id);
        off!(
            ch,
            "struct blkif_request_indirect",
            "sector_number",
            $indirect,
            sector_number
        );
        off!(
            ch,
            "struct blkif_request_indirect",
            "handle",
            $indirect,
            handle
        );
        off!(
            ch,
            "struct blkif_request_indirect",
            "indirect_grefs",
            $indirect,
            indirect_grefs
        );
        size!(ch, "struct blkif_response", $rsp);
        off!(ch, "struct blkif_response", "operation", $rsp, operation);
        off!(ch, "struct blkif_response", "status", $rsp, status);
        konst!(
            ch,
            "sizeof union blkif_sring_entry",
            xen::ring::slot_size_of::<$req, $rsp>()
        );
        for pages in 1..=16usize {
            ch.check(
                &format!("ring blkif {pages}"),
                ring_size_of::<$req, $rsp>(pages * 4096).into(),
            );
        }
    }};
}

fn ring_sizes<Req, Rsp>(ch: &mut Checker, name: &str) {
    for pages in 1..=16usize {
        ch.check(
            &format!("ring {name} {pages}"),
            ring_size_of::<Req, Rsp>(pages * 4096).into(),
        );
    }
}

fn check_xen_public(ch: &mut Checker) {
    blkif_checks!(
        &mut *ch,
        BlkifRequest,
        BlkifRequestDiscard,
        BlkifRequestIndirect,
        BlkifResponse
    );
    konst!(ch, "BLKIF_OP_READ", BLKIF_OP_READ);
    konst!(ch, "BLKIF_OP_WRITE", BLKIF_OP_WRITE);
    konst!(ch, "BLKIF_OP_WRITE_BARRIER", BLKIF_OP_WRITE_BARRIER);
    konst!(ch, "BLKIF_OP_FLUSH_DISKCACHE", BLKIF_OP_FLUSH_DISKCACHE);
    konst!(ch, "BLKIF_OP_RESERVED_1", BLKIF_OP_RESERVED_1);
    konst!(ch, "BLKIF_OP_DISCARD", BLKIF_OP_DISCARD);
    konst!(ch, "BLKIF_OP_INDIRECT", BLKIF_OP_INDIRECT);
    konst!(
        ch,
        "BLKIF_MAX_SEGMENTS_PER_REQUEST",
        BLKIF_MAX_SEGMENTS_PER_REQUEST
    );
    konst!(
        ch,
        "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
        BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
    );
    konst!(ch, "BLKIF_DISCARD_SECURE", BLKIF_DISCARD_SECURE);
    konst!(ch, "BLKIF_RSP_EOPNOTSUPP", BLKIF_RSP_EOPNOTSUPP);
    konst!(ch, "BLKIF_RSP_ERROR", BLKIF_RSP_ERROR);
    konst!(ch, "BLKIF_RSP_OKAY", BLKIF_RSP_OKAY);
    konst!(ch, "VDISK_CDROM", VDISK_CDROM);
    konst!(ch, "VDISK_REMOVABLE", VDISK_REMOVABLE);
    konst!(ch, "VDISK_READONLY", VDISK_READONLY);

    size!(ch, "grant_entry_v1_t", GrantEntryV1);
    off!(ch, "grant_entry_v1_t", "flags", GrantEntryV1, flags);
    off!(ch, "grant_entry_v1_t", "domid", GrantEntryV1, domid);
    off!(ch, "grant_entry_v1_t", "frame", GrantEntryV1, frame);
    konst!(ch, "GTF_invalid", GTF_INVALID);
    konst!(ch, "GTF_permit_access", GTF_PERMIT_ACCESS);
    konst!(ch, "GTF_accept_transfer", GTF_ACCEPT_TRANSFER);
    konst!(ch, "GTF_transitive", GTF_TRANSITIVE);
    konst!(ch, "GTF_type_mask", GTF_TYPE_MASK);
    konst!(ch, "GTF_readonly", GTF_READONLY);
    konst!(ch, "GTF_reading", GTF_READING);
    konst!(ch, "GTF_writing", GTF_WRITING);
    konst!(ch, "GTF_PWT", GTF_PWT);
    konst!(ch, "GTF_PCD", GTF_PCD);
    konst!(ch, "GTF_PAT", GTF_PAT);
    konst!(ch, "GTF_sub_page", GTF_SUB_PAGE);
    konst!(ch, "GNTST_okay", GNTST_OKAY);
    konst!(ch, "GNTST_general_error", GNTST_GENERAL_ERROR);
    konst!(ch, "GNTST_bad_domain", GNTST_BAD_DOMAIN);
    konst!(ch, "GNTST_bad_gntref", GNTST_BAD_GNTREF);
    konst!(ch, "GNTST_bad_handle", GNTST_BAD_HANDLE);
    konst!(ch, "GNTST_bad_virt_addr", GNTST_BAD_VIRT_ADDR);
    konst!(ch, "GNTST_bad_dev_addr", GNTST_BAD_DEV_ADDR);
    konst!(ch, "GNTST_no_device_space", GNTST_NO_DEVICE_SPACE);
    konst!(ch, "GNTST_permission_denied", GNTST_PERMISSION_DENIED);
    konst!(ch, "GNTST_bad_page", GNTST_BAD_PAGE);
    konst!(ch, "GNTST_bad_copy_arg", GNTST_BAD_COPY_ARG);
    konst!(ch, "GNTST_address_too_big", GNTST_ADDRESS_TOO_BIG);
    konst!(ch, "GNTST_eagain", GNTST_EAGAIN);
    konst!(ch, "GNTST_no_space", GNTST_NO_SPACE);
    konst!(ch, "GNTCOPY_source_gref", GNTCOPY_SOURCE_GREF);
    konst!(ch, "GNTCOPY_dest_gref", GNTCOPY_DEST_GREF);

    size!(ch, "struct evtchn_alloc_unbound", EvtchnAllocUnbound);
    off!(
        ch,
        "struct evtchn_alloc_unbound",
        "remote_dom",
        EvtchnAllocUnbound,
        remote_dom
    );
    off!(
        ch,
        "struct evtchn_alloc_unbound",
        "port",
        EvtchnAllocUnbound,
        port
    );
    size!(ch, "struct evtchn_bind_interdomain", EvtchnBindInterdomain);
    off!(
        ch,
        "struct evtchn_bind_interdomain",
        "remote_port",
        EvtchnBindInterdomain,
        remote_port
    );
    off!(
        ch,
        "struct evtchn_bind_interdomain",
        "local_port",
        EvtchnBindInterdomain,
        local_port
    );
    size!(ch, "struct evtchn_send", EvtchnSend);
    size!(ch, "struct evtchn_close", EvtchnClose);
    konst!(ch, "EVTCHNOP_bind_interdomain", EVTCHNOP_BIND_INTERDOMAIN);
    konst!(ch, "EVTCHNOP_bind_virq", EVTCHNOP_BIND_VIRQ);
    konst!(ch, "EVTCHNOP_bind_pirq", EVTCHNOP_BIND_PIRQ);
    konst!(ch, "EVTCHNOP_close", EVTCHNOP_CLOSE);
    konst!(ch, "EVTCHNOP_send", EVTCHNOP_SEND);
    konst!(ch, "EVTCHNOP_status", EVTCHNOP_STATUS);
    konst!(ch, "EVTCHNOP_alloc_unbound", EVTCHNOP_ALLOC_UNBOUND);
    konst!(ch, "EVTCHNOP_bind_ipi", EVTCHNOP_BIND_IPI);
    konst!(ch, "EVTCHNOP_bind_vcpu", EVTCHNOP_BIND_VCPU);
    konst!(ch, "EVTCHNOP_unmask", EVTCHNOP_UNMASK);
    konst!(ch, "EVTCHNOP_reset", EVTCHNOP_RESET);
    konst!(ch, "DOMID_FIRST_RESERVED", DOMID_FIRST_RESERVED);
    konst!(ch, "DOMID_SELF", xen::DOMID_SELF);

    konst!(ch, "offsetof struct blkif_sring req_prod", SRING_REQ_PROD);
    konst!(ch, "offsetof struct blkif_sring req_event", SRING_REQ_EVENT);
    konst!(ch, "offsetof struct blkif_sring rsp_prod", SRING_RSP_PROD);
    konst!(ch, "offsetof struct blkif_sring rsp_event", SRING_RSP_EVENT);
    konst!(
        ch,
        "offsetof struct blkif_sring pvt",
        offset_of!(SringHeader, pvt)
    );
    konst!(
        ch,
        "offsetof struct blkif_sring __pad",
        offset_of!(SringHeader, pad)
    );
    konst!(ch, "offsetof struct blkif_sring ring", SRING_RING_OFFSET);
    assert_eq!(size_of::<SringHeader>(), SRING_HEADER_SIZE);
    assert_eq!(offset_of!(SringHeader, req_event), SRING_REQ_EVENT);
    assert_eq!(offset_of!(SringHeader, rsp_prod), SRING_RSP_PROD);
    assert_eq!(offset_of!(SringHeader, rsp_event), SRING_RSP_EVENT);

    konst!(ch, "XEN_NETIF_NR_SLOTS_MIN", XEN_NETIF_NR_SLOTS_MIN);
    konst!(ch, "XEN_NETIF_MAX_TX_SIZE", XEN_NETIF_MAX_TX_SIZE);
    konst!(ch, "NETTXF_csum_blank", NETTXF_CSUM_BLANK);
    konst!(ch, "NETTXF_data_validated", NETTXF_DATA_VALIDATED);
    konst!(ch, "NETTXF_more_data", NETTXF_MORE_DATA);
    konst!(ch, "NETTXF_extra_info", NETTXF_EXTRA_INFO);
    konst!(ch, "NETRXF_data_validated", NETRXF_DATA_VALIDATED);
    konst!(ch, "NETRXF_csum_blank", NETRXF_CSUM_BLANK);
    konst!(ch, "NETRXF_more_data", NETRXF_MORE_DATA);
    konst!(ch, "NETRXF_extra_info", NETRXF_EXTRA_INFO);
    konst!(ch, "NETRXF_gso_prefix", NETRXF_GSO_PREFIX);
    konst!(ch, "XEN_NETIF_EXTRA_TYPE_NONE", XEN_NETIF_EXTRA_TYPE_NONE);
    konst!(ch, "XEN_NETIF_EXTRA_TYPE_GSO", XEN_NETIF_EXTRA_TYPE_GSO);
    konst!(
        ch,
        "XEN_NETIF_EXTRA_TYPE_MCAST_ADD",
        XEN_NETIF_EXTRA_TYPE_MCAST_ADD
    );
    konst!(
        ch,
        "XEN_NETIF_EXTRA_TYPE_MCAST_DEL",
        XEN_NETIF_EXTRA_TYPE_MCAST_DEL
    );
    konst!(ch, "XEN_NETIF_EXTRA_TYPE_HASH", XEN_NETIF_EXTRA_TYPE_HASH);
    konst!(ch, "XEN_NETIF_EXTRA_TYPE_MAX", XEN_NETIF_EXTRA_TYPE_MAX);
    konst!(ch, "XEN_NETIF_EXTRA_FLAG_MORE", XEN_NETIF_EXTRA_FLAG_MORE);
    konst!(ch, "XEN_NETIF_GSO_TYPE_NONE", XEN_NETIF_GSO_TYPE_NONE);
    konst!(ch, "XEN_NETIF_GSO_TYPE_TCPV4", XEN_NETIF_GSO_TYPE_TCPV4);
    konst!(ch, "XEN_NETIF_GSO_TYPE_TCPV6", XEN_NETIF_GSO_TYPE_TCPV6);
    konst!(ch, "NETIF_RSP_DROPPED", NETIF_RSP_DROPPED);
    konst!(ch, "NETIF_RSP_ERROR", NETIF_RSP_ERROR);
    konst!(ch, "NETIF_RSP_OKAY", NETIF_RSP_OKAY);
    konst!(ch, "NETIF_RSP_NULL", NETIF_RSP_NULL);
    konst!(
        ch,
        "XEN_NETIF_CTRL_HASH_TYPE_IPV4",
        XEN_NETIF_CTRL_HASH_TYPE_IPV4
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP",
        XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_HASH_TYPE_IPV6",
        XEN_NETIF_CTRL_HASH_TYPE_IPV6
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP",
        XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_HASH_ALGORITHM_NONE",
        XEN_NETIF_CTRL_HASH_ALGORITHM_NONE
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ",
        XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_TYPE_INVALID",
        XEN_NETIF_CTRL_TYPE_INVALID
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS",
        XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS",
        XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_TYPE_SET_HASH_KEY",
        XEN_NETIF_CTRL_TYPE_SET_HASH_KEY
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE",
        XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE",
        XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING",
        XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM",
        XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE",
        XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING",
        XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING",
        XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_STATUS_SUCCESS",
        XEN_NETIF_CTRL_STATUS_SUCCESS
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED",
        XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER",
        XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER
    );
    konst!(
        ch,
        "XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW",
        XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW
    );
    konst!(
        ch,
        "XEN_NETIF_CTRLF_GREF_readonly",
        XEN_NETIF_CTRLF_GREF_READONLY
    );
    size!(ch, "struct netif_tx_request", NetifTxRequest);
    off!(
        ch,
        "struct netif_tx_request",
        "offset",
        NetifTxRequest,
        offset
    );
    off!(
        ch,
        "struct netif_tx_request",
        "flags",
        NetifTxRequest,
        flags
    );
    off!(ch, "struct netif_tx_request", "id", NetifTxRequest, id);
    off!(ch, "struct netif_tx_request", "size", NetifTxRequest, size);
    size!(ch, "struct netif_tx_response", NetifTxResponse);
    off!(
        ch,
        "struct netif_tx_response",
        "status",
        NetifTxResponse,
        status
    );
    size!(ch, "struct netif_rx_request", NetifRxRequest);
    off!(ch, "struct netif_rx_request", "gref", NetifRxRequest, gref);
    size!(ch, "struct netif_rx_response", NetifRxResponse);
    off!(
        ch,
        "struct netif_rx_response",
        "offset",
        NetifRxResponse,
        offset
    );
    off!(
        ch,
        "struct netif_rx_response",
        "flags",
        NetifRxResponse,
        flags
    );
    off!(
        ch,
        "struct netif_rx_response",
        "status",
        NetifRxResponse,
        status
    );
    size!(ch, "struct netif_extra_info", NetifExtraInfo);
    off!(
        ch,
        "struct netif_extra_info",
        "flags",
        NetifExtraInfo,
        flags
    );
    off!(ch, "struct netif_extra_info", "u", NetifExtraInfo, u);
    let u = NETIF_EXTRA_INFO_U_OFFSET;
    assert_eq!(offset_of!(NetifExtraInfo, u), u);
    konst!(
        ch,
        "offsetof struct netif_extra_info u.gso.size",
        u + offset_of!(NetifExtraGso, size)
    );
    konst!(
        ch,
        "offsetof struct netif_extra_info u.gso.type",
        u + offset_of!(NetifExtraGso, type_)
    );
    konst!(
        ch,
        "offsetof struct netif_extra_info u.gso.pad",
        u + offset_of!(NetifExtraGso, pad)
    );
    konst!(
        ch,
        "offsetof struct netif_extra_info u.gso.features",
        u + offset_of!(NetifExtraGso, features)
    );
    konst!(
        ch,
        "offsetof struct netif_extra_info u.mcast.addr",
        u + offset_of!(NetifExtraMcast, addr)
    );
    konst!(
        ch,
        "offsetof struct netif_extra_info u.hash.type",
        u + offset_of!(NetifExtraHash, type_)
    );
    konst!(
        ch,
        "offsetof struct netif_extra_info u.hash.algorithm",
        u + offset_of!(NetifExtraHash, algorithm)
    );
    konst!(
        ch,
        "offsetof struct netif_extra_info u.hash.value",
        u + offset_of!(NetifExtraHash, value)
    );
    size!(ch, "struct xen_netif_ctrl_request", XenNetifCtrlRequest);
    off!(
        ch,
        "struct xen_netif_ctrl_request",
        "type",
        XenNetifCtrlRequest,
        type_
    );
    off!(
        ch,
        "struct xen_netif_ctrl_request",
        "data",
        XenNetifCtrlRequest,
        data
    );
    size!(ch, "struct xen_netif_ctrl_response", XenNetifCtrlResponse);
    off!(
        ch,
        "struct xen_netif_ctrl_response",
        "type",
        XenNetifCtrlResponse,
        type_
    );
    off!(
        ch,
        "struct xen_netif_ctrl_response",
        "status",
        XenNetifCtrlResponse,
        status
    );
    off!(
        ch,
        "struct xen_netif_ctrl_response",
        "data",
        XenNetifCtrlResponse,
        data
    );
    size!(ch, "struct xen_netif_gref", XenNetifGref);
    off!(ch, "struct xen_netif_gref", "flags", XenNetifGref, flags);
    off!(ch, "struct xen_netif_gref", "status", XenNetifGref, status);
    konst!(
        ch,
        "sizeof union netif_tx_sring_entry",
        xen::ring::slot_size_of::<NetifTxRequest, NetifTxResponse>()
    );
    konst!(
        ch,
        "sizeof union netif_rx_sring_entry",
        xen::ring::slot_size_of::<NetifRxRequest, NetifRxResponse>()
    );
    konst!(
        ch,
        "sizeof union xen_netif_ctrl_sring_entry",
        xen::ring::slot_size_of::<XenNetifCtrlRequest, XenNetifCtrlResponse>()
    );
    ring_sizes::<NetifTxRequest, NetifTxResponse>(ch, "netif_tx");
    ring_sizes::<NetifRxRequest, NetifRxResponse>(ch, "netif_rx");
    ring_sizes::<XenNetifCtrlRequest, XenNetifCtrlResponse>(ch, "xen_netif_ctrl");

    konst!(ch, "IOREQ_READ", IOREQ_READ);
    konst!(ch, "IOREQ_WRITE", IOREQ_WRITE);
    konst!(ch, "STATE_IOREQ_NONE", STATE_IOREQ_NONE);
    konst!(ch, "STATE_IOREQ_READY", STATE_IOREQ_READY);
    konst!(ch, "STATE_IOREQ_INPROCESS", STATE_IOREQ_INPROCESS);
    konst!(ch, "STATE_IORESP_READY", STATE_IORESP_READY);
    konst!(ch, "IOREQ_TYPE_PIO", IOREQ_TYPE_PIO);
    konst!(ch, "IOREQ_TYPE_COPY", IOREQ_TYPE_COPY);
    konst!(ch, "IOREQ_TYPE_PCI_CONFIG", IOREQ_TYPE_PCI_CONFIG);
    konst!(ch, "IOREQ_TYPE_TIMEOFFSET", IOREQ_TYPE_TIMEOFFSET);
    konst!(ch, "IOREQ_TYPE_INVALIDATE", IOREQ_TYPE_INVALIDATE);
    konst!(ch, "IOREQ_BUFFER_SLOT_NUM", IOREQ_BUFFER_SLOT_NUM);
    size!(ch, "ioreq_t", Ioreq);
    konst!(ch, "sizeof ioreq_t", IOREQ_SIZE);
    off!(ch, "ioreq_t", "data", Ioreq, data);
    off!(ch, "ioreq_t", "count", Ioreq, count);
    off!(ch, "ioreq_t", "size", Ioreq, size);
    off!(ch, "ioreq_t", "vp_eport", Ioreq, vp_eport);
    off!(ch, "ioreq_t", "_pad0", Ioreq, _pad0);
    off!(ch, "ioreq_t", "type", Ioreq, type_);
    assert_eq!(offset_of!(Ioreq, bits), IOREQ_STATE_OFFSET);
    size!(ch, "shared_iopage_t", SharedIopage);
    size!(ch, "buf_ioreq_t", BufIoreq);
    konst!(ch, "sizeof buf_ioreq_t", BUF_IOREQ_SIZE);
    off!(ch, "buf_ioreq_t", "data", BufIoreq, data);
    size!(ch, "buffered_iopage_t", BufferedIopage);
    off!(
        ch,
        "buffered_iopage_t",
        "read_pointer",
        BufferedIopage,
        read_pointer
    );
    off!(
        ch,
        "buffered_iopage_t",
        "write_pointer",
        BufferedIopage,
        write_pointer
    );
    off!(
        ch,
        "buffered_iopage_t",
        "buf_ioreq",
        BufferedIopage,
        buf_ioreq
    );
    konst!(
        ch,
        "offsetof buffered_iopage_t read_pointer",
        BUFIOREQ_READ_POINTER_OFFSET
    );
    konst!(
        ch,
        "offsetof buffered_iopage_t write_pointer",
        BUFIOREQ_WRITE_POINTER_OFFSET
    );
    konst!(
        ch,
        "offsetof buffered_iopage_t buf_ioreq",
        BUFIOREQ_SLOTS_OFFSET
    );
    konst!(
        ch,
        "ioreq bits state=a ptr=1 dir=0 df=1",
        Ioreq::make_bits(0xa, true, IOREQ_WRITE, true)
    );
    konst!(
        ch,
        "ioreq bits dir=1",
        Ioreq::make_bits(0, false, IOREQ_READ, false)
    );
    let probe = Ioreq {
        bits: 0x5a,
        ..Default::default()
    };
    assert_eq!(
        (probe.state(), probe.data_is_ptr(), probe.dir(), probe.df()),
        (0xa, true, 0, true)
    );
    konst!(
        ch,
        "buf_ioreq word type=ab pad=1 dir=0 size=2 addr=12345",
        BufIoreq::make(0xab, 1, 0, 2, 0x12345, 0).word
    );
    konst!(
        ch,
        "buf_ioreq word dir=1 size=3 addr=fffff",
        BufIoreq::make(0, 0, 1, 3, 0xfffff, 0).word
    );
    konst!(ch, "HVM_IOREQSRV_BUFIOREQ_OFF", HVM_IOREQSRV_BUFIOREQ_OFF);
    konst!(
        ch,
        "HVM_IOREQSRV_BUFIOREQ_LEGACY",
        HVM_IOREQSRV_BUFIOREQ_LEGACY
    );
    konst!(
        ch,
        "HVM_IOREQSRV_BUFIOREQ_ATOMIC",
        HVM_IOREQSRV_BUFIOREQ_ATOMIC
    );
    konst!(
        ch,
        "XENMEM_resource_ioreq_server",
        xen::Resource::IoreqServer(0).type_and_id().0
    );
    konst!(
        ch,
        "XENMEM_resource_grant_table",
        xen::Resource::GrantTable.type_and_id().0
    );
    konst!(
        ch,
        "XENMEM_resource_ioreq_server_frame_bufioreq",
        XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ
    );
    konst!(
        ch,
        "XENMEM_resource_ioreq_server_frame_ioreq(0)",
        xenmem_resource_ioreq_server_frame_ioreq(0)
    );
    konst!(
        ch,
        "XENMEM_resource_ioreq_server_frame_ioreq(3)",
        xenmem_resource_ioreq_server_frame_ioreq(3)
    );

    konst!(
        ch,
        "XEN_DMOP_create_ioreq_server",
        XEN_DMOP_CREATE_IOREQ_SERVER
    );
    konst!(
        ch,
        "XEN_DMOP_get_ioreq_server_info",
        XEN_DMOP_GET_IOREQ_SERVER_INFO
    );
    konst!(
        ch,
        "XEN_DMOP_map_io_range_to_ioreq_server",
        XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER
    );
    konst!(
        ch,
        "XEN_DMOP_unmap_io_range_from_ioreq_server",
        XEN_DMOP_UNMAP_IO_RANGE_FROM_IOREQ_SERVER
    );
    konst!(
        ch,
        "XEN_DMOP_set_ioreq_server_state",
        XEN_DMOP_SET_IOREQ_SERVER_STATE
    );
    konst!(
        ch,
        "XEN_DMOP_destroy_ioreq_server",
        XEN_DMOP_DESTROY_IOREQ_SERVER
    );
    konst!(ch, "XEN_DMOP_track_dirty_vram", XEN_DMOP_TRACK_DIRTY_VRAM);
    konst!(
        ch,
        "XEN_DMOP_set_pci_intx_level",
        XEN_DMOP_SET_PCI_INTX_LEVEL
    );
    konst!(ch, "XEN_DMOP_set_isa_irq_level", XEN_DMOP_SET_ISA_IRQ_LEVEL);
    konst!(
        ch,
        "XEN_DMOP_set_pci_link_route",
        XEN_DMOP_SET_PCI_LINK_ROUTE
    );
    konst!(ch, "XEN_DMOP_modified_memory", XEN_DMOP_MODIFIED_MEMORY);
    konst!(ch, "XEN_DMOP_set_mem_type", XEN_DMOP_SET_MEM_TYPE);
    konst!(ch, "XEN_DMOP_inject_event", XEN_DMOP_INJECT_EVENT);
    konst!(ch, "XEN_DMOP_inject_msi", XEN_DMOP_INJECT_MSI);
    konst!(
        ch,
        "XEN_DMOP_map_mem_type_to_ioreq_server",
        XEN_DMOP_MAP_MEM_TYPE_TO_IOREQ_SERVER
    );
    konst!(ch, "XEN_DMOP_remote_shutdown", XEN_DMOP_REMOTE_SHUTDOWN);
    konst!(ch, "XEN_DMOP_relocate_memory", XEN_DMOP_RELOCATE_MEMORY);
    konst!(
        ch,
        "XEN_DMOP_pin_memory_cacheattr",
        XEN_DMOP_PIN_MEMORY_CACHEATTR
    );
    konst!(ch, "XEN_DMOP_set_irq_level", XEN_DMOP_SET_IRQ_LEVEL);
    konst!(ch, "XEN_DMOP_nr_vcpus", XEN_DMOP_NR_VCPUS);
    konst!(ch, "XEN_DMOP_no_gfns", XEN_DMOP_NO_GFNS);
    konst!(ch, "XEN_DMOP_IO_RANGE_PORT", XEN_DMOP_IO_RANGE_PORT);
    konst!(ch, "XEN_DMOP_IO_RANGE_MEMORY", XEN_DMOP_IO_RANGE_MEMORY);
    konst!(ch, "XEN_DMOP_IO_RANGE_PCI", XEN_DMOP_IO_RANGE_PCI);
    konst!(
        ch,
        "XEN_DMOP_PCI_SBDF(1, 2, 0x1f, 7)",
        xen_dmop_pci_sbdf(1, 2, 0x1f, 7)
    );
    konst!(
        ch,
        "(uint32_t)XEN_DMOP_PCI_SBDF(0xffff, 0xff, 0xff, 0xff)",
        xen_dmop_pci_sbdf(0xffff, 0xff, 0xff, 0xff)
    );
    size!(
        ch,
        "struct xen_dm_op_create_ioreq_server",
        XenDmOpCreateIoreqServer
    );
    off!(
        ch,
        "struct xen_dm_op_create_ioreq_server",
        "pad",
        XenDmOpCreateIoreqServer,
        pad
    );
    off!(
        ch,
        "struct xen_dm_op_create_ioreq_server",
        "id",
        XenDmOpCreateIoreqServer,
        id
    );
    size!(
        ch,
        "struct xen_dm_op_get_ioreq_server_info",
        XenDmOpGetIoreqServerInfo
    );
    off!(
        ch,
        "struct xen_dm_op_get_ioreq_server_info",
        "flags",
        XenDmOpGetIoreqServerInfo,
        flags
    );
    off!(
        ch,
        "struct xen_dm_op_get_ioreq_server_info",
        "bufioreq_port",
        XenDmOpGetIoreqServerInfo,
        bufioreq_port
    );
    off!(
        ch,
        "struct xen_dm_op_get_ioreq_server_info",
        "ioreq_gfn",
        XenDmOpGetIoreqServerInfo,
        ioreq_gfn
    );
    off!(
        ch,
        "struct xen_dm_op_get_ioreq_server_info",
        "bufioreq_gfn",
        XenDmOpGetIoreqServerInfo,
        bufioreq_gfn
    );
    size!(
        ch,
        "struct xen_dm_op_ioreq_server_range",
        XenDmOpIoreqServerRange
    );
    off!(
        ch,
        "struct xen_dm_op_ioreq_server_range",
        "pad",
        XenDmOpIoreqServerRange,
        pad
    );
    off!(
        ch,
        "struct xen_dm_op_ioreq_server_range",
        "type",
        XenDmOpIoreqServerRange,
        type_
    );
    off!(
        ch,
        "struct xen_dm_op_ioreq_server_range",
        "start",
        XenDmOpIoreqServerRange,
        start
    );
    off!(
        ch,
        "struct xen_dm_op_ioreq_server_range",
        "end",
        XenDmOpIoreqServerRange,
        end
    );
    size!(
        ch,
        "struct xen_dm_op_set_ioreq_server_state",
        XenDmOpSetIoreqServerState
    );
    off!(
        ch,
        "struct xen_dm_op_set_ioreq_server_state",
        "enabled",
        XenDmOpSetIoreqServerState,
        enabled
    );
    size!(
        ch,
        "struct xen_dm_op_destroy_ioreq_server",
        XenDmOpDestroyIoreqServer
    );
    size!(
        ch,
        "struct xen_dm_op_set_pci_intx_level",
        XenDmOpSetPciIntxLevel
    );
    off!(
        ch,
        "struct xen_dm_op_set_pci_intx_level",
        "bus",
        XenDmOpSetPciIntxLevel,
        bus
    );
    off!(
        ch,
        "struct xen_dm_op_set_pci_intx_level",
        "device",
        XenDmOpSetPciIntxLevel,
        device
    );
    off!(
        ch,
        "struct xen_dm_op_set_pci_intx_level",
        "intx",
        XenDmOpSetPciIntxLevel,
        intx
    );
    off!(
        ch,
        "struct xen_dm_op_set_pci_intx_level",
        "level",
        XenDmOpSetPciIntxLevel,
        level
    );
    size!(
        ch,
        "struct xen_dm_op_set_isa_irq_level",
        XenDmOpSetIsaIrqLevel
    );
    off!(
        ch,
        "struct xen_dm_op_set_isa_irq_level",
        "level",
        XenDmOpSetIsaIrqLevel,
        level
    );
    size!(
        ch,
        "struct xen_dm_op_remote_shutdown",
        XenDmOpRemoteShutdown
    );
    size!(ch, "struct xen_dm_op_inject_msi", XenDmOpInjectMsi);
    off!(
        ch,
        "struct xen_dm_op_inject_msi",
        "pad",
        XenDmOpInjectMsi,
        pad
    );
    off!(
        ch,
        "struct xen_dm_op_inject_msi",
        "addr",
        XenDmOpInjectMsi,
        addr
    );
    size!(ch, "struct xen_dm_op", XenDmOp);
    off!(ch, "struct xen_dm_op", "pad", XenDmOp, pad);
    off!(ch, "struct xen_dm_op", "u", XenDmOp, u);
    konst!(ch, "sizeof xen_dm_op.u", XEN_DM_OP_UNION_SIZE);
    assert_eq!(size_of::<[u64; 3]>(), XEN_DM_OP_UNION_SIZE);

    size!(ch, "struct xsd_sockmsg", XsdSockmsg);
    konst!(ch, "sizeof struct xsd_sockmsg", XSD_SOCKMSG_SIZE);
    off!(ch, "struct xsd_sockmsg", "req_id", XsdSockmsg, req_id);
    off!(ch, "struct xsd_sockmsg", "tx_id", XsdSockmsg, tx_id);
    off!(ch, "struct xsd_sockmsg", "len", XsdSockmsg, len);
    size!(
        ch,
        "struct xenstore_domain_interface",
        XenstoreDomainInterface
    );
    off!(
        ch,
        "struct xenstore_domain_interface",
        "rsp",
        XenstoreDomainInterface,
        rsp
    );
    off!(
        ch,
        "struct xenstore_domain_interface",
        "req_cons",
        XenstoreDomainInterface,
        req_cons
    );
    off!(
        ch,
        "struct xenstore_domain_interface",
        "req_prod",
        XenstoreDomainInterface,
        req_prod
    );
    off!(
        ch,
        "struct xenstore_domain_interface",
        "rsp_cons",
        XenstoreDomainInterface,
        rsp_cons
    );
    off!(
        ch,
        "struct xenstore_domain_interface",
        "rsp_prod",
        XenstoreDomainInterface,
        rsp_prod
    );
    off!(
        ch,
        "struct xenstore_domain_interface",
        "server_features",
        XenstoreDomainInterface,
        server_features
    );
    off!(
        ch,
        "struct xenstore_domain_interface",
        "connection",
        XenstoreDomainInterface,
        connection
    );
    off!(
        ch,
        "struct xenstore_domain_interface",
        "error",
        XenstoreDomainInterface,
        error
    );
    konst!(ch, "XENSTORE_PAYLOAD_MAX", XENSTORE_PAYLOAD_MAX);
    konst!(ch, "XENSTORE_ABS_PATH_MAX", XENSTORE_ABS_PATH_MAX);
    konst!(ch, "XENSTORE_REL_PATH_MAX", XENSTORE_REL_PATH_MAX);
    konst!(ch, "XENSTORE_RING_SIZE", XENSTORE_RING_SIZE);
    konst!(ch, "XS_CONTROL", msg::XS_CONTROL);
    konst!(ch, "XS_DIRECTORY", msg::XS_DIRECTORY);
    konst!(ch, "XS_READ", msg::XS_READ);
    konst!(ch, "XS_WATCH", msg::XS_WATCH);
    konst!(ch, "XS_TRANSACTION_START", msg::XS_TRANSACTION_START);
    konst!(ch, "XS_TRANSACTION_END", msg::XS_TRANSACTION_END);
    konst!(ch, "XS_INTRODUCE", msg::XS_INTRODUCE);
    konst!(ch, "XS_WRITE", msg::XS_WRITE);
    konst!(ch, "XS_RM", msg::XS_RM);
    konst!(ch, "XS_WATCH_EVENT", msg::XS_WATCH_EVENT);
    konst!(ch, "XS_ERROR", msg::XS_ERROR);
    konst!(ch, "XS_RESET_WATCHES", msg::XS_RESET_WATCHES);
    konst!(ch, "XS_DIRECTORY_PART", msg::XS_DIRECTORY_PART);
    konst!(ch, "XS_TYPE_COUNT", msg::XS_TYPE_COUNT);
    konst!(ch, "XS_INVALID", msg::XS_INVALID);
}

fn check_linux_uapi(ch: &mut Checker) {
    size!(ch, "struct ioctl_evtchn_bind_virq", IoctlEvtchnBindVirq);
    size!(
        ch,
        "struct ioctl_evtchn_bind_interdomain",
        IoctlEvtchnBindInterdomain
    );
    off!(
        ch,
        "struct ioctl_evtchn_bind_interdomain",
        "remote_port",
        IoctlEvtchnBindInterdomain,
        remote_port
    );
    size!(
        ch,
        "struct ioctl_evtchn_bind_unbound_port",
        IoctlEvtchnBindUnboundPort
    );
    size!(ch, "struct ioctl_evtchn_unbind", IoctlEvtchnUnbind);
    size!(ch, "struct ioctl_evtchn_notify", IoctlEvtchnNotify);
    size!(
        ch,
        "struct ioctl_evtchn_restrict_domid",
        IoctlEvtchnRestrictDomid
    );
    konst!(ch, "IOCTL_EVTCHN_BIND_VIRQ", IOCTL_EVTCHN_BIND_VIRQ);
    konst!(
        ch,
        "IOCTL_EVTCHN_BIND_INTERDOMAIN",
        IOCTL_EVTCHN_BIND_INTERDOMAIN
    );
    konst!(
        ch,
        "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
        IOCTL_EVTCHN_BIND_UNBOUND_PORT
    );
    konst!(ch, "IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND);
    konst!(ch, "IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY);
    konst!(ch, "IOCTL_EVTCHN_RESET", IOCTL_EVTCHN_RESET);
    konst!(
        ch,
        "IOCTL_EVTCHN_RESTRICT_DOMID",
        IOCTL_EVTCHN_RESTRICT_DOMID
    );

    size!(ch, "struct ioctl_gntdev_grant_ref", IoctlGntdevGrantRef);
    off!(
        ch,
        "struct ioctl_gntdev_grant_ref",
        "ref",
        IoctlGntdevGrantRef,
        ref_
    );
    size!(
        ch,
        "struct ioctl_gntdev_map_grant_ref",
        IoctlGntdevMapGrantRef
    );
    off!(
        ch,
        "struct ioctl_gntdev_map_grant_ref",
        "index",
        IoctlGntdevMapGrantRef,
        index
    );
    off!(
        ch,
        "struct ioctl_gntdev_map_grant_ref",
        "refs",
        IoctlGntdevMapGrantRef,
        refs
    );
    assert_eq!(
        offset_of!(IoctlGntdevMapGrantRef, refs),
        GNTDEV_MAP_GRANT_REF_REFS_OFFSET
    );
    size!(
        ch,
        "struct ioctl_gntdev_unmap_grant_ref",
        IoctlGntdevUnmapGrantRef
    );
    off!(
        ch,
        "struct ioctl_gntdev_unmap_grant_ref",
        "count",
        IoctlGntdevUnmapGrantRef,
        count
    );
    size!(
        ch,
        "struct ioctl_gntdev_get_offset_for_vaddr",
        IoctlGntdevGetOffsetForVaddr
    );
    off!(
        ch,
        "struct ioctl_gntdev_get_offset_for_vaddr",
        "offset",
        IoctlGntdevGetOffsetForVaddr,
        offset
    );
    off!(
        ch,
        "struct ioctl_gntdev_get_offset_for_vaddr",
        "count",
        IoctlGntdevGetOffsetForVaddr,
        count
    );
    size!(
        ch,
        "struct ioctl_gntdev_set_max_grants",
        IoctlGntdevSetMaxGrants
    );
    size!(
        ch,
        "struct ioctl_gntdev_unmap_notify",
        IoctlGntdevUnmapNotify
    );
    off!(
        ch,
        "struct ioctl_gntdev_unmap_notify",
        "action",
        IoctlGntdevUnmapNotify,
        action
    );
    off!(
        ch,
        "struct ioctl_gntdev_unmap_notify",
        "event_channel_port",
        IoctlGntdevUnmapNotify,
        event_channel_port
    );
    size!(
        ch,
        "struct gntdev_grant_copy_segment",
        GntdevGrantCopySegment
    );
    off!(
        ch,
        "struct gntdev_grant_copy_segment",
        "source",
        GntdevGrantCopySegment,
        source
    );
    off!(
        ch,
        "struct gntdev_grant_copy_segment",
        "dest",
        GntdevGrantCopySegment,
        dest
    );
    off!(
        ch,
        "struct gntdev_grant_copy_segment",
        "len",
        GntdevGrantCopySegment,
        len
    );
    off!(
        ch,
        "struct gntdev_grant_copy_segment",
        "flags",
        GntdevGrantCopySegment,
        flags
    );
    off!(
        ch,
        "struct gntdev_grant_copy_segment",
        "status",
        GntdevGrantCopySegment,
        status
    );
    // The foreign member of the union, as GntdevCopyPtr::foreign packs it (little-endian).
    let f = GntdevCopyPtr::foreign(0x1122_3344, 0x5566, 0x7788)
        .raw
        .to_le_bytes();
    let pos = |needle: &[u8]| {
        f.windows(needle.len())
            .position(|w| w == needle)
            .unwrap_or(99)
    };
    konst!(
        ch,
        "offsetof struct gntdev_grant_copy_segment source.foreign.ref",
        pos(&0x1122_3344u32.to_le_bytes())
    );
    konst!(
        ch,
        "offsetof struct gntdev_grant_copy_segment source.foreign.offset",
        pos(&0x5566u16.to_le_bytes())
    );
    konst!(
        ch,
        "offsetof struct gntdev_grant_copy_segment source.foreign.domid",
        pos(&0x7788u16.to_le_bytes())
    );
    size!(ch, "struct ioctl_gntdev_grant_copy", IoctlGntdevGrantCopy);
    off!(
        ch,
        "struct ioctl_gntdev_grant_copy",
        "segments",
        IoctlGntdevGrantCopy,
        segments
    );
    konst!(ch, "UNMAP_NOTIFY_CLEAR_BYTE", UNMAP_NOTIFY_CLEAR_BYTE);
    konst!(ch, "UNMAP_NOTIFY_SEND_EVENT", UNMAP_NOTIFY_SEND_EVENT);
    konst!(ch, "IOCTL_GNTDEV_MAP_GRANT_REF", IOCTL_GNTDEV_MAP_GRANT_REF);
    konst!(
        ch,
        "IOCTL_GNTDEV_UNMAP_GRANT_REF",
        IOCTL_GNTDEV_UNMAP_GRANT_REF
    );
    konst!(
        ch,
        "IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR",
        IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR
    );
    konst!(
        ch,
        "IOCTL_GNTDEV_SET_MAX_GRANTS",
        IOCTL_GNTDEV_SET_MAX_GRANTS
    );
    konst!(
        ch,
        "IOCTL_GNTDEV_SET_UNMAP_NOTIFY",
        IOCTL_GNTDEV_SET_UNMAP_NOTIFY
    );
    konst!(ch, "IOCTL_GNTDEV_GRANT_COPY", IOCTL_GNTDEV_GRANT_COPY);

    size!(ch, "struct privcmd_hypercall", PrivcmdHypercall);
    size!(ch, "struct privcmd_mmapbatch_v2", PrivcmdMmapbatchV2);
    off!(
        ch,
        "struct privcmd_mmapbatch_v2",
        "dom",
        PrivcmdMmapbatchV2,
        dom
    );
    off!(
        ch,
        "struct privcmd_mmapbatch_v2",
        "addr",
        PrivcmdMmapbatchV2,
        addr
    );
    off!(
        ch,
        "struct privcmd_mmapbatch_v2",
        "arr",
        PrivcmdMmapbatchV2,
        arr
    );
    off!(
        ch,
        "struct privcmd_mmapbatch_v2",
        "err",
        PrivcmdMmapbatchV2,
        err
    );
    size!(ch, "struct privcmd_dm_op_buf", PrivcmdDmOpBuf);
    off!(ch, "struct privcmd_dm_op_buf", "size", PrivcmdDmOpBuf, size);
    size!(ch, "struct privcmd_dm_op", PrivcmdDmOp);
    off!(ch, "struct privcmd_dm_op", "num", PrivcmdDmOp, num);
    off!(ch, "struct privcmd_dm_op", "ubufs", PrivcmdDmOp, ubufs);
    size!(ch, "struct privcmd_mmap_resource", PrivcmdMmapResource);
    off!(
        ch,
        "struct privcmd_mmap_resource",
        "type",
        PrivcmdMmapResource,
        type_
    );
    off!(
        ch,
        "struct privcmd_mmap_resource",
        "id",
        PrivcmdMmapResource,
        id
    );
    off!(
        ch,
        "struct privcmd_mmap_resource",
        "idx",
        PrivcmdMmapResource,
        idx
    );
    off!(
        ch,
        "struct privcmd_mmap_resource",
        "num",
        PrivcmdMmapResource,
        num
    );
    off!(
        ch,
        "struct privcmd_mmap_resource",
        "addr",
        PrivcmdMmapResource,
        addr
    );
    konst!(ch, "IOCTL_PRIVCMD_HYPERCALL", IOCTL_PRIVCMD_HYPERCALL);
    konst!(ch, "IOCTL_PRIVCMD_MMAPBATCH_V2", IOCTL_PRIVCMD_MMAPBATCH_V2);
    konst!(ch, "IOCTL_PRIVCMD_DM_OP", IOCTL_PRIVCMD_DM_OP);
    konst!(ch, "IOCTL_PRIVCMD_RESTRICT", IOCTL_PRIVCMD_RESTRICT);
    konst!(
        ch,
        "IOCTL_PRIVCMD_MMAP_RESOURCE",
        IOCTL_PRIVCMD_MMAP_RESOURCE
    );
}

#[test]
fn test_header_check_without_headers_names_the_packages() {
    let empty = out_dir().join("no-headers");
    std::fs::create_dir_all(&empty).unwrap();

    let problem = header_problem(&empty);

    let msg = problem.expect("an empty include root must be reported");
    assert!(msg.contains("libxen-dev"), "{msg}");
    assert!(msg.contains("xen/io/blkif.h"), "{msg}");
}

#[test]
fn test_checker_mismatch_missing_and_unchecked_values_all_reported() {
    let c: BTreeMap<String, i128> = [
        ("a".to_string(), 1),
        ("b".to_string(), 2),
        ("extra".to_string(), 3),
    ]
    .into();
    let mut ch = Checker::new("probe", c);

    ch.check("a", 1);
    ch.check("b", 5);
    ch.check("absent", 0);
    let errors = ch.finish();

    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("`b`: C 2 != Rust 5")));
    assert!(errors.iter().any(|e| e.contains("`absent`: not printed")));
    assert!(errors
        .iter()
        .any(|e| e.contains("`extra`: printed by C but not checked")));
}

#[test]
fn test_abi_layouts_match_c_headers_all_agree() {
    // Arrange: build and run the probes.
    require_headers();
    let xen_native = native("xen_public.c", &[]);
    let xen_i386 = i386("xen_public.c");
    let stub = format!("-I{LAYOUT_DIR}/stub");
    let uapi = native("linux_uapi.c", &[&stub]);

    // Act: compare every value.
    let mut ch = Checker::new("xen public (x86_64)", xen_native);
    check_xen_public(&mut ch);
    let mut errors = ch.finish();

    let mut ch = Checker::new("xen public (i386: x86_32-abi)", xen_i386);
    blkif_checks!(
        &mut ch,
        BlkifX86_32Request,
        BlkifX86_32RequestDiscard,
        BlkifX86_32RequestIndirect,
        BlkifX86_32Response
    );
    errors.extend(ch.finish());

    let mut ch = Checker::new("linux uapi", uapi);
    check_linux_uapi(&mut ch);
    errors.extend(ch.finish());

    // Assert: no mismatch anywhere.
    assert!(
        errors.is_empty(),
        "{} layout mismatches:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

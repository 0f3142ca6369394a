//! `domio probe`: checks that this host's Xen interfaces work, one line per check
//! (`PASS <check>` or `FAIL <check>: <reason>`); exits 0 only if every check passed.
//! The real-Xen lab runs it in dom0; the tests run it against xensim.

use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use xen::{DomId, XenHost};
use xenbus::{XsClient, XsOps};

use crate::serve::{open_xenstore, XsKind};
use crate::target::Target;

/// Arguments of `domio probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Xen host: `linux` or `sim:PATH`.
    #[arg(long, default_value = "linux")]
    pub xen: Target,
    /// xenstore transports to check (comma-separated: socket, device).
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [XsKind::Socket, XsKind::Device])]
    pub xenstore: Vec<XsKind>,
    /// Path of the xenstored socket (default /run/xenstored/socket).
    #[arg(long)]
    pub xenstore_path: Option<PathBuf>,
}

fn readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let ms =
        PollTimeout::try_from(timeout.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
    matches!(poll(&mut fds, ms), Ok(n) if n > 0)
}

fn check_xenstore(xs: &XsClient, own: DomId, tag: &str) -> anyhow::Result<()> {
    let base = format!(
        "/local/domain/{own}/domio-probe/{}-{tag}",
        std::process::id()
    );
    let key = format!("{base}/key");
    xs.write(&key, b"value-1").context("write")?;
    let v = xs.read(&key).context("read back")?;
    if v != b"value-1" {
        bail!(
            "read back {:?}, wrote \"value-1\"",
            String::from_utf8_lossy(&v)
        );
    }
    let w = xs.watch(&key, "probe").context("watch")?;
    // A watch fires once when it is set, then on every change.
    w.recv_timeout(Duration::from_secs(5))
        .map_err(|e| anyhow!("no initial watch event: {e:?}"))?;
    xs.write(&key, b"value-2").context("write under watch")?;
    let ev = w
        .recv_timeout(Duration::from_secs(5))
        .map_err(|e| anyhow!("no watch event after write: {e:?}"))?;
    if ev.path != key {
        bail!("watch event for {:?}, expected {key:?}", ev.path);
    }
    xs.transaction(|tx| {
        let cur = tx.read(&key)?;
        tx.write(&format!("{base}/tx"), &cur)
    })
    .context("transaction")?;
    let t = xs
        .read(&format!("{base}/tx"))
        .context("read after transaction")?;
    if t != b"value-2" {
        bail!("transaction wrote {:?}", String::from_utf8_lossy(&t));
    }
    xs.rm(&base).context("rm")?;
    if xs.try_read(&key).context("read after rm")?.is_some() {
        bail!("{key} still exists after rm");
    }
    Ok(())
}

fn check_evtchn(host: &dyn XenHost) -> anyhow::Result<()> {
    let own = host.own_domid();
    let h = host.open_evtchn().context("open")?;
    // Loopback: allocate an unbound port for ourselves, bind to it, and send across.
    let a = h.bind_unbound(own).context("alloc unbound")?;
    let b = h
        .bind_interdomain(own, a)
        .context("bind interdomain to our own unbound port")?;
    h.notify(b).context("notify")?;
    if !readable(h.fd(), Duration::from_secs(5)) {
        bail!("port {a} not delivered within 5 s after notify on {b}");
    }
    let mut ports = [0u32; 8];
    let n = h.pending(&mut ports).context("pending")?;
    if !ports[..n].contains(&a) {
        bail!("pending ports {:?} do not include {a}", &ports[..n]);
    }
    h.unmask(a).context("unmask")?;
    h.unbind(b).context("unbind")?;
    h.unbind(a).context("unbind unbound port")?;
    Ok(())
}

/// Runs `domio probe`.
pub fn run(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    let host = args.xen.open(0)?;
    let own = host.own_domid();
    let mut failed = 0;
    let mut report = |name: &str, r: anyhow::Result<()>| match r {
        Ok(()) => println!("PASS {name}"),
        Err(e) => {
            failed += 1;
            println!("FAIL {name}: {e:#}");
        }
    };
    for kind in &args.xenstore {
        let name = match kind {
            XsKind::Socket => "xenstore-socket",
            XsKind::Device => "xenstore-xenbus-device",
        };
        let r = open_xenstore(host.as_ref(), *kind, args.xenstore_path.as_ref())
            .and_then(|xs| check_xenstore(&xs, own, name));
        report(name, r);
    }
    report("evtchn", check_evtchn(host.as_ref()));
    report(
        "gntdev-open",
        host.open_gnttab().map(drop).map_err(Into::into),
    );
    report(
        "privcmd-foreign-open",
        host.open_foreign().map(drop).map_err(Into::into),
    );
    report(
        "privcmd-dm-open",
        host.open_devmodel().map(drop).map_err(Into::into),
    );
    println!("{} checks failed", failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

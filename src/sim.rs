//! `domio sim`: the simulated Xen host as a daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tracing::info;
use xensim::host::Host;
use xensim::server::Server;

use crate::demo::{add_console_device, DemoGuest};

/// Arguments of `domio sim`.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// Socket to listen on; attach domio with `--xen sim:PATH`.
    #[arg(long, default_value = "/tmp/xensim.sock")]
    pub socket: PathBuf,
    /// Create a guest with this name (repeatable). Each gets a PV console whose frontend
    /// writes a line every `--tick-ms` once a backend connects.
    #[arg(long = "guest")]
    pub guests: Vec<String>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 64)]
    pub memory_mib: u64,
    /// Interval between the demo guests' console lines.
    #[arg(long, default_value_t = 1000)]
    pub tick_ms: u64,
}

/// Runs `domio sim`.
pub fn run(args: SimArgs) -> anyhow::Result<ExitCode> {
    if args.memory_mib == 0 || args.memory_mib > 16384 {
        anyhow::bail!(
            "--memory-mib {} is out of range (1..=16384)",
            args.memory_mib
        );
    }
    let signals = crate::signals::termination()?;
    let host = Host::new().context("creating the simulated host")?;
    let server = Server::start(host.clone(), &args.socket)
        .with_context(|| format!("listening on {}", args.socket.display()))?;
    let mut guests = Vec::new();
    for name in &args.guests {
        let domid = host
            .create_domain(name, args.memory_mib * 256)
            .with_context(|| format!("creating guest {name}"))?;
        add_console_device(&host, domid)?;
        println!(
            "guest {name} is dom{domid}: serve it with  domio serve --domid {domid} --xen sim:{}",
            args.socket.display()
        );
        guests.push(DemoGuest::start(
            Arc::clone(&host),
            domid,
            std::time::Duration::from_millis(args.tick_ms),
        )?);
    }
    println!(
        "xensim host listening on {} ({} guests); Ctrl-C to stop",
        server.path().display(),
        guests.len()
    );
    let sig = signals.recv().context("waiting for a signal")?;
    info!(signal = sig.as_str(), "xensim host stopping");
    for g in guests {
        g.stop();
    }
    drop(server);
    Ok(ExitCode::SUCCESS)
}

//! domio: Xen device backends and HVM device model, one process per guest.
//!
//! Subcommands: `serve` (the per-guest service a toolstack starts), `sim` (the simulated Xen
//! host as a daemon), `demo` (host, guest and domio in one command), `probe` (checks that the
//! Xen interfaces of this host work: used by the real-Xen lab).
#![deny(unsafe_code)]

mod bench;
mod control;
mod demo;
mod hvm;
mod logging;
mod probe;
mod serve;
mod signals;
mod sim;
mod target;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Userspace Xen device backends (blkback, netback) and HVM device model, one process per guest.
#[derive(Debug, Parser)]
#[command(name = "domio", version, about, propagate_version = true)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = logging::Format::Human)]
    log_format: logging::Format,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `domio=debug,xenbus=trace`.
    /// Overrides RUST_LOG.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the PV backends of one guest domain until SIGTERM/SIGINT/SIGHUP.
    Serve(serve::ServeArgs),
    /// Run the simulated Xen host as a daemon on a unix socket.
    Sim(sim::SimArgs),
    /// Start a simulated host, a guest and domio in one process and show them working.
    Demo(demo::DemoArgs),
    /// Check this host's Xen interfaces (xenstore, event channels, grants, privcmd).
    Probe(probe::ProbeArgs),
    /// Measure a backend driven by a simulated guest in this process.
    Bench(bench::BenchArgs),
    /// Be the ioreq server and device model of one HVM guest, built from its `.hvm` config.
    Hvm(hvm::HvmArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init(cli.log_format, cli.log.as_deref()) {
        eprintln!("domio: {e:#}");
        return ExitCode::from(2);
    }
    let r = match cli.cmd {
        Command::Serve(a) => serve::run(a),
        Command::Sim(a) => sim::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Probe(a) => probe::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Hvm(a) => hvm::run(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("domio: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

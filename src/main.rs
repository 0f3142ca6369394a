//! domio: Xen device backends and HVM device model, one process per guest.
//!
//! Subcommands: `serve` (the per-guest service a toolstack starts), `sim` (the simulated Xen
//! host as a daemon), `demo` (host, guest and domio in one command), `probe` (checks that the
//! Xen interfaces of this host work: used by the real-Xen lab), `qemu-compat` (the device
//! model xl spawns; also chosen when argv[1] is `-xen-domid`, as libxl passes it).
#![deny(unsafe_code)]

mod bench;
mod control;
mod demo;
mod dm;
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
    /// Be the device model xl spawns (`device_model_override=`), from libxl's qemu-style
    /// command line. Chosen without this word when the first argument is `-xen-domid`.
    QemuCompat {
        /// The qemu-style arguments, e.g. `-xen-domid 3 -machine xenpv ...`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// A QMP client: connects to a device model's QMP socket, sends standard input as it is
    /// (or the commands given with --execute, after qmp_capabilities) and prints what comes
    /// back.
    Qmp(dm::client::QmpArgs),
}

fn main() -> ExitCode {
    // libxl runs its device model with qemu's command line: `domio -xen-domid N ...`.
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if dm::argv::looks_like_qemu(&argv) {
        return run_logged(logging::Format::Human, None, || dm::run(&argv));
    }
    let cli = Cli::parse();
    let cmd = cli.cmd;
    run_logged(cli.log_format, cli.log.as_deref(), move || match cmd {
        Command::Serve(a) => serve::run(a),
        Command::Sim(a) => sim::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Probe(a) => probe::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Hvm(a) => hvm::run(a),
        Command::QemuCompat { args } => dm::run(&args),
        Command::Qmp(a) => dm::client::run(a),
    })
}

/// Sets up logging, runs `f`, and reports its error on stderr.
fn run_logged(
    format: logging::Format,
    filter: Option<&str>,
    f: impl FnOnce() -> anyhow::Result<ExitCode>,
) -> ExitCode {
    if let Err(e) = logging::init(format, filter) {
        eprintln!("domio: {e:#}");
        return ExitCode::from(2);
    }
    match f() {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("domio: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

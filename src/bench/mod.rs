//! `domio bench`: measurements of domio's backends driven by xensim's guest frontends in one
//! process.
//!
//! * `domio bench blk`: a simulated host and guest, domio's blkback started exactly as
//!   `domio serve` starts it, and the guest's blkfront (negotiating as Linux's xen-blkfront)
//!   driving it with one thread per queue at a fixed queue depth.

mod blk;
mod cpu;
#[cfg(test)]
mod e2e;
#[cfg(test)]
mod fake;
mod hist;

use std::process::ExitCode;

use clap::{Args, Subcommand};

pub use blk::BlkArgs;

/// Arguments of `domio bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[command(subcommand)]
    pub cmd: BenchCmd,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Block I/O through blkback: IOPS, bandwidth, latency percentiles, CPU per request.
    Blk(BlkArgs),
}

/// Runs `domio bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.cmd {
        BenchCmd::Blk(a) => blk::run(a),
    }
}

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
mod ioreq;
mod net;
mod vblk;

use std::process::ExitCode;

use clap::{Args, Subcommand};

pub use blk::BlkArgs;
pub use ioreq::IoreqArgs;
pub use net::NetArgs;
pub use vblk::VirtioBlkArgs;

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
    /// Network I/O through netback: TCP throughput and small-frame packet rate, next to veth
    /// and raw tap writes measured in the same run.
    Net(NetArgs),
    /// The ioreq round trip (a vCPU's port I/O answered by domio) next to an eventfd
    /// ping-pong between two threads.
    Ioreq(IoreqArgs),
    /// 4 KiB random reads through the HVM device model's virtio-blk (doorbells as ioreqs,
    /// completions as MSIs), to set beside `domio bench blk` on the same image.
    VirtioBlk(VirtioBlkArgs),
}

/// Runs `domio bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.cmd {
        BenchCmd::Blk(a) => blk::run(a),
        BenchCmd::Net(a) => net::run(a),
        BenchCmd::Ioreq(a) => ioreq::run(a),
        BenchCmd::VirtioBlk(a) => vblk::run(a),
    }
}

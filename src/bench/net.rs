//! `domio bench net` (being built; see the issue).

use std::process::ExitCode;

use clap::Args;

/// Arguments of `domio bench net`.
#[derive(Debug, Args)]
pub struct NetArgs {
    /// Seconds to run each measurement.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Print one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark.
pub fn run(_a: NetArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("domio bench net is not built yet")
}

//! `domio hvm`: the HVM device model for one guest (being built; see the issue).

use std::process::ExitCode;

use clap::Args;

/// Arguments of `domio hvm`.
#[derive(Debug, Args)]
pub struct HvmArgs {
    /// The guest domain.
    #[arg(long)]
    pub domid: u32,
    /// The guest's xl.cfg-style `.hvm` file.
    #[arg(long)]
    pub config: std::path::PathBuf,
}

/// Runs the device model.
pub fn run(_a: HvmArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("domio hvm is not built yet")
}

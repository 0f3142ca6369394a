//! `--xen linux|sim:PATH`: which Xen host to attach to.

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::Context;
use xen::{DomId, XenHost};

/// Where domio's Xen interfaces go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The real /dev/xen devices and xenstored of this dom0.
    Linux,
    /// A xensim daemon at this socket.
    Sim(PathBuf),
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "linux" {
            return Ok(Target::Linux);
        }
        match s.strip_prefix("sim:") {
            Some("") => Err(
                "--xen sim:PATH needs the path of a xensim socket (as printed by `domio sim`)"
                    .into(),
            ),
            Some(p) => Ok(Target::Sim(PathBuf::from(p))),
            None => Err(format!("--xen {s:?}: expected `linux` or `sim:PATH`")),
        }
    }
}

impl Target {
    /// Opens the host, as domain `own` (0 = dom0).
    pub fn open(&self, own: DomId) -> anyhow::Result<Box<dyn XenHost>> {
        match self {
            Target::Linux => Ok(Box::new(xen::linux::LinuxHost::new())),
            Target::Sim(p) => Ok(Box::new(
                xensim::client::SimHost::connect(p.clone(), own)
                    .with_context(|| format!("attaching to the xensim host at {}", p.display()))?,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_target_parse_accepts_linux_and_sim_path() {
        assert_eq!("linux".parse::<Target>(), Ok(Target::Linux));
        assert_eq!(
            "sim:/tmp/x.sock".parse::<Target>(),
            Ok(Target::Sim("/tmp/x.sock".into()))
        );
    }

    #[test]
    fn test_target_parse_rejects_others_with_a_clear_message() {
        let e = "xen".parse::<Target>().unwrap_err();
        assert!(e.contains("expected `linux` or `sim:PATH`"), "{e}");
        let e = "sim:".parse::<Target>().unwrap_err();
        assert!(e.contains("needs the path"), "{e}");
    }
}

//! Termination signals, delivered to one thread through a blocked signal mask and sigwait,
//! so that shutdown is an ordinary message rather than work inside a signal handler.

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread (call before spawning any thread, so all
/// threads inherit the mask) and returns a channel that receives each one as it arrives.
pub fn termination() -> anyhow::Result<Receiver<Signal>> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .context("blocking signals")?;
    let (tx, rx): (Sender<Signal>, Receiver<Signal>) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(sig) => {
                    if tx.send(sig).is_err() {
                        break;
                    }
                }
                Err(_) => continue,
            }
        })
        .context("starting the signal thread")?;
    Ok(rx)
}

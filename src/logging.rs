//! tracing setup: human-readable or JSON lines on stderr (xl sends stderr to
//! /var/log/xen/qemu-dm-<name>.log).

use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One readable line per event.
    Human,
    /// One JSON object per line.
    Json,
}

/// The filter when neither `--log` nor `RUST_LOG` gives one. virtio-queue logs the guest's
/// ring mistakes itself, through the `log` crate and with no rate limit, and a guest can
/// repeat them (reset, set up a bad ring, DRIVER_OK, in a loop, or race our checks); domio
/// checks and logs each of those cases itself at a rate limit (XSA-180), so virtio-queue's
/// own lines are off unless a filter asks for them (`--log info,virtio_queue=error`).
pub const DEFAULT_FILTER: &str = "info,virtio_queue=off";

/// Installs the global subscriber.
pub fn init(format: Format, filter: Option<&str>) -> anyhow::Result<()> {
    let filter = match filter {
        Some(f) => EnvFilter::try_new(f).with_context(|| format!("invalid --log filter {f:?}"))?,
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
        }
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let r = match format {
        Format::Human => builder.with_target(false).try_init(),
        Format::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    r.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt;

    /// Counts the events that reach it.
    struct Count(Arc<AtomicUsize>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
        fn on_event(&self, _: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn test_default_filter_drops_virtio_queue_lines_and_keeps_ours() {
        let n = Arc::new(AtomicUsize::new(0));
        let sub = tracing_subscriber::registry()
            .with(EnvFilter::new(DEFAULT_FILTER))
            .with(Count(n.clone()));
        tracing::subscriber::with_default(sub, || {
            tracing::error!(target: "virtio_queue::queue", "invalid available ring index");
            assert_eq!(n.load(Ordering::SeqCst), 0);
            tracing::warn!(target: "devmodel::virtio", "queue 0: ring outside RAM");
            tracing::info!("domio serving");
            tracing::debug!("not at the default level");
        });
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }
}

//! The shutdown signal: SIGINT (Ctrl-C) or SIGTERM (systemd, Kubernetes).

use tokio::signal::unix::{SignalKind, signal as unix_signal};

/// Resolves on the first SIGINT or SIGTERM.
///
/// # Panics
///
/// If the signal handlers cannot be installed (no tokio runtime with signals enabled).
pub async fn signal() {
    let mut term = unix_signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = unix_signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down");
}

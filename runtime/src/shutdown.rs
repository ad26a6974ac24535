//! The shutdown signal: SIGINT (Ctrl-C) or SIGTERM (systemd, Kubernetes).

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal as unix_signal};

/// Installs the SIGINT and SIGTERM handlers now, and returns a future that resolves on the
/// first of them.
///
/// The handlers are in place when this returns, not when the future is first polled: a
/// daemon calls it before it starts its work, so a SIGTERM that arrives while it is still
/// setting up (before anything awaits the future) stops it cleanly instead of killing it.
///
/// # Panics
///
/// Outside a tokio runtime with signals enabled, or if the handlers cannot be installed.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    let mut term = unix_signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = unix_signal(SignalKind::interrupt()).expect("install SIGINT handler");
    async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// A SIGTERM sent before anything polls the future is not lost (and does not kill the
    /// test process): the handler was installed by the call.
    #[tokio::test]
    async fn a_signal_before_the_first_poll_is_kept() {
        let shutdown = super::signal();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).expect("raise SIGTERM");
        tokio::time::timeout(Duration::from_secs(5), shutdown)
            .await
            .expect("the SIGTERM raised before the first poll resolves the future");
    }
}

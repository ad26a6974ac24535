//! relay-sink: the cloud end of sflow-relay.
//!
//! Accepts relay agents over QUIC with mutual TLS (only certificates signed by the configured
//! CA, with the clientAuth usage), reads their batches, replays every datagram byte for byte as
//! UDP to each destination, and acknowledges each batch to its agent.
//!
//! # Layout
//!
//! - [`config`] — command-line and file options, and the checked [`Config`].
//! - `ingress`: transports that bring batches in (QUIC).
//! - [`replay`] — per-destination UDP senders with bounded queues.
//! - [`metrics`] — counters.
//!
//! [`run`] takes the bound UDP socket and a shutdown future, so tests and the demo can drive
//! it without a process of its own.

pub mod config;
mod ingress;
pub mod metrics;
pub mod replay;

use std::future::Future;
use std::sync::Arc;

pub use config::{Args, Config};
pub use metrics::Metrics;
use replay::Replay;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Errors that stop the sink from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Certificates or keys could not be loaded, or do not fit together.
    #[error(transparent)]
    Certs(#[from] certs::Error),
    /// The QUIC endpoint could not be set up.
    #[error("cannot start QUIC on {0}: {1}")]
    Quic(std::net::SocketAddr, String),
    /// A replay destination could not be set up.
    #[error("replay destination {0}: {1}")]
    Destination(String, String),
}

/// What the connection tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    config: Config,
    replay: Replay,
    metrics: Arc<Metrics>,
    /// Refusal logging, limited per kind of refusal (so a flood of one kind cannot hide
    /// another).
    refusals: ingress::Refusals,
}

/// Runs the sink on `socket` until `shutdown` resolves, then stops accepting, closes agent
/// connections and finishes replaying what was received (within `shutdown_grace`).
///
/// # Errors
///
/// When certificates cannot be loaded or a destination cannot be set up.
pub async fn run(
    config: Config,
    socket: std::net::UdpSocket,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let ca = certs::TrustAnchors::load(&config.ca)?;
    let identity = certs::Identity::load(&config.cert, &config.key)?;
    let tls = certs::server_config(&ca, &identity, proto::ALPN)?;
    let local = socket
        .local_addr()
        .map_err(|e| Error::Quic(config.listen, e.to_string()))?;
    let quic_tls = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| Error::Quic(local, e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic_tls));
    server.transport_config(Arc::new(config.quic.transport_config()));
    let key_material = std::fs::read(&config.key).unwrap_or_default();
    let endpoint = runtime::quic::endpoint(socket, Some(server), Some(&key_material))
        .map_err(|e| Error::Quic(local, e.to_string()))?;

    let mut replay_tasks = JoinSet::new();
    let replay = Replay::start(
        &config.forward,
        config.replay_queue,
        config.send_buffer,
        metrics.clone(),
        &mut replay_tasks,
    )
    .await?;
    let grace = config.shutdown_grace;
    let shared = Arc::new(Shared {
        config,
        replay,
        metrics: metrics.clone(),
        refusals: ingress::Refusals::default(),
    });
    tracing::info!(
        listen = %local,
        identity = identity.name(),
        expires_in_days = identity.info().seconds_to_expiry() / 86_400,
        "sink listening for agents (QUIC, mutual TLS)"
    );

    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let accept = tokio::spawn(ingress::quic::serve(
        endpoint.clone(),
        shared.clone(),
        token.clone(),
        tracker.clone(),
    ));
    shutdown.await;
    token.cancel();
    let _ = accept.await;
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("connections did not finish within the shutdown grace period");
    }
    // Dropping the last `Replay` closes the destination queues; their tasks drain and end.
    drop(shared);
    if tokio::time::timeout(grace, async {
        while replay_tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            "replay did not finish within the shutdown grace period; queued datagrams dropped"
        );
    }
    endpoint.close(0u32.into(), b"sink shutting down");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
    tracing::info!(
        datagrams_received = Metrics::get(&metrics.datagrams_received),
        datagrams_replayed = Metrics::get(&metrics.datagrams_replayed),
        replay_errors = Metrics::get(&metrics.replay_errors),
        replay_queue_drops = Metrics::get(&metrics.replay_queue_drops),
        connections_accepted = Metrics::get(&metrics.connections_accepted),
        handshakes_refused = Metrics::get(&metrics.handshakes_refused),
        protocol_errors = Metrics::get(&metrics.protocol_errors),
        "sink stopped"
    );
    Ok(())
}

//! relay-sink: the cloud end of sflow-relay.
//!
//! Accepts relay agents over QUIC, and over gRPC (HTTP/2 over TLS on TCP) on the same port
//! number, both with mutual TLS (only certificates signed by the configured CA, with the
//! clientAuth usage); reads their batches, replays every datagram byte for byte as UDP to each
//! destination, and acknowledges each batch to its agent.
//!
//! # Layout
//!
//! - [`config`] — command-line and file options, and the checked [`Config`].
//! - `ingress`: transports that bring batches in (QUIC, gRPC), and what they share.
//! - [`replay`] — per-destination UDP senders with bounded queues.
//! - [`metrics`] — counters.
//!
//! [`run`] takes sockets bound by [`bind`] and a shutdown future, so tests and the demo can
//! drive it without a process of its own.

pub mod config;
mod ingress;
pub mod metrics;
pub mod replay;

use std::future::Future;
use std::net::{SocketAddr, TcpListener, UdpSocket};
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
    Quic(SocketAddr, String),
    /// The gRPC listener could not be set up.
    #[error("cannot start gRPC on {0}: {1}")]
    Grpc(SocketAddr, String),
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
    /// What each agent session has had replayed, to drop resends.
    replayed: ingress::Replayed,
}

/// The sink's bound sockets.
#[derive(Debug)]
pub struct Listeners {
    /// QUIC (UDP).
    pub quic: UdpSocket,
    /// gRPC (TCP), unless turned off.
    pub grpc: Option<TcpListener>,
}

/// Binds the QUIC socket (with the configured buffers) and the gRPC listener.
///
/// When both ask for the same address with port 0, they get the same port number: the UDP
/// port is picked first, and picked again should that number be taken on TCP.
///
/// # Errors
///
/// When an address cannot be bound; the error names it.
pub fn bind(config: &Config) -> Result<Listeners, String> {
    let buffers = runtime::udp::Buffers {
        recv: Some(config.recv_buffer),
        send: Some(config.recv_buffer),
    };
    let quic = |addr: SocketAddr| {
        runtime::udp::bind(addr, buffers).map_err(|e| format!("cannot listen on {addr} (UDP): {e}"))
    };
    let grpc = |addr: SocketAddr| {
        TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr} (TCP): {e}"))
    };
    match config.grpc_listen {
        None => Ok(Listeners {
            quic: quic(config.listen)?,
            grpc: None,
        }),
        Some(tcp) if tcp == config.listen && tcp.port() == 0 => {
            let mut last = String::new();
            for _ in 0..32 {
                let udp = quic(config.listen)?;
                let port = udp.local_addr().map_err(|e| e.to_string())?.port();
                match grpc(SocketAddr::new(tcp.ip(), port)) {
                    Ok(listener) => {
                        return Ok(Listeners {
                            quic: udp,
                            grpc: Some(listener),
                        });
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
        Some(tcp) => Ok(Listeners {
            quic: quic(config.listen)?,
            grpc: Some(grpc(tcp)?),
        }),
    }
}

/// Runs the sink on `listeners` until `shutdown` resolves, then stops accepting, closes agent
/// connections and finishes replaying what was received (within `shutdown_grace`).
///
/// # Errors
///
/// When certificates cannot be loaded or a destination cannot be set up.
pub async fn run(
    config: Config,
    listeners: Listeners,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let ca = certs::TrustAnchors::load(&config.ca)?;
    let identity = certs::Identity::load(&config.cert, &config.key)?;
    let tls = certs::server_config(&ca, &identity, proto::ALPN)?;
    let grpc_tls = Arc::new(certs::server_config(&ca, &identity, proto::GRPC_ALPN)?);
    let socket = listeners.quic;
    let local = socket
        .local_addr()
        .map_err(|e| Error::Quic(config.listen, e.to_string()))?;
    let grpc_listener = match listeners.grpc {
        Some(listener) => {
            let addr = listener
                .local_addr()
                .map_err(|e| Error::Grpc(local, e.to_string()))?;
            listener
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(listener))
                .map(|l| Some((l, addr)))
                .map_err(|e| Error::Grpc(addr, e.to_string()))?
        }
        None => None,
    };
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
        replay::Pace {
            max_pps: config.replay_max_pps,
            max_bps: config.replay_max_bps,
        },
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
        replayed: ingress::Replayed::default(),
    });
    tracing::info!(
        listen = %local,
        grpc_listen = grpc_listener.as_ref().map(|(_, addr)| addr.to_string()).unwrap_or_else(|| "off".into()),
        identity = identity.name(),
        expires_in_days = identity.info().seconds_to_expiry() / 86_400,
        "sink listening for agents (mutual TLS)"
    );

    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let accept = tokio::spawn(ingress::quic::serve(
        endpoint.clone(),
        shared.clone(),
        token.clone(),
        tracker.clone(),
    ));
    let grpc = grpc_listener.map(|(listener, _)| {
        tracker.spawn(ingress::grpc::serve(
            listener,
            grpc_tls,
            shared.clone(),
            token.clone(),
        ))
    });
    shutdown.await;
    token.cancel();
    let _ = accept.await;
    drop(grpc);
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
        datagrams_duplicate = Metrics::get(&metrics.datagrams_duplicate),
        replay_errors = Metrics::get(&metrics.replay_errors),
        replay_queue_drops = Metrics::get(&metrics.replay_queue_drops),
        connections_accepted = Metrics::get(&metrics.connections_accepted),
        handshakes_refused = Metrics::get(&metrics.handshakes_refused),
        protocol_errors = Metrics::get(&metrics.protocol_errors),
        "sink stopped"
    );
    Ok(())
}

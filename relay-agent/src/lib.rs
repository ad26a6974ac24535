//! relay-agent: the site end of sflow-relay.
//!
//! Receives sFlow datagrams on UDP, batches them, and streams the batches to each configured
//! sink over QUIC with mutual TLS, or over gRPC (HTTP/2 over TLS on TCP) where UDP cannot get
//! out. The receive path never waits on the network: bounded queues
//! sit between receiving, batching and each sink, and every drop is counted and logged.
//!
//! ```text
//! UDP sockets ─► receive ─► (queue) ─► batch ─┬─► (queue) ─► link (QUIC | gRPC) ─► sink A
//!                                             └─► (queue) ─► link (QUIC | gRPC) ─► sink B
//! ```
//!
//! # Layout
//!
//! - [`config`] — command-line and file options, and the checked [`Config`].
//! - `receive`: the UDP receive loops.
//! - `batch`: batching (one batch per distinct route) and fan-out to the sinks' queues.
//! - `routes`: which datagrams each sink takes over time: its `agents` filter, the end of its
//!   feed at `not-after`, and their reload from the config file.
//! - `links`: each sink's parts set up at start (credentials, backlog, intake, link task).
//! - `reload`: each sink's certificate files, checked again on SIGHUP and every poll interval.
//! - [`enroll`] — `relay-agent enroll`: a certificate from a sink's enrollment port with a
//!   one-time token, the key made here; and the renewal call.
//! - `renew`: automatic renewal of the certificates at two thirds of their lifetime.
//! - `backlog`: per sink, every batch not yet acknowledged (memory, and the spool), read by
//!   the link from any point, released on acknowledgement.
//! - `spool`: the backlog's crash-safe copy on disk (checksummed segment files).
//! - `transport`: one link per sink (QUIC, gRPC, or QUIC with fallback to gRPC), with
//!   reconnect backoff.
//! - [`metrics`] — Prometheus counters and gauges.
//! - `status`: readiness and the values refreshed at each scrape (`--metrics-listen`).
//!
//! [`run`] takes bound sockets and a shutdown future, so tests and the demo (`relay-demo`)
//! can drive it without a process of its own.

mod backlog;
mod batch;
pub mod config;
pub mod enroll;
mod links;
pub mod metrics;
mod receive;
mod reload;
mod renew;
mod routes;
mod spool;
mod status;
mod transport;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use config::{Args, Config};
use metrics::DropReason;
pub use metrics::{Metrics, SinkMetrics};
use quinn::VarInt;
use runtime::udp::{self, Buffers};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Chunks (the datagrams of one receive call, at most `udp::RECV_BATCH`) queued between the
/// receive loops and the batcher.
const INGEST_QUEUE: usize = 1024;

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Certificates or keys could not be loaded, or do not fit together.
    #[error("sink {0}: {1}")]
    Certs(String, certs::Error),
    /// A sink's settings cannot work (say, a server name that is no DNS name or address).
    #[error("sink {0}: {1}")]
    Config(String, String),
    /// The QUIC endpoint could not be set up.
    #[error("cannot start QUIC: {0}")]
    Quic(String),
    /// A spool directory cannot be used.
    #[error("spool {0}: {1}")]
    Spool(String, std::io::Error),
    /// A UDP socket could not be registered.
    #[error("UDP socket: {0}")]
    Socket(std::io::Error),
    /// The metrics endpoint could not be started.
    #[error("metrics endpoint: {0}")]
    Metrics(String),
    /// Where a certificate renews cannot be read.
    #[error("certificate renewal: {0}")]
    Renew(String),
}

/// Starts a renewal task per certificate that renews (`--renew-from`, or an `agent.renew`
/// file next to it).
fn start_renewals(
    config: &Config,
    metrics: &Metrics,
    token: &CancellationToken,
) -> Result<tokio_util::task::TaskTracker, Error> {
    let tasks = tokio_util::task::TaskTracker::new();
    let plans = renew::plan(&config.sinks, config.renew_from.as_deref()).map_err(Error::Renew)?;
    if plans.is_empty() {
        return Ok(tasks);
    }
    let renew_metrics = renew::RenewMetrics::register(metrics.registry());
    for plan in plans {
        tracing::info!(
            cert = %plan.cert.display(),
            renew_from = %plan.from.renew_from,
            "the certificate renews automatically at two thirds of its lifetime"
        );
        tasks.spawn(renew::run(plan, renew_metrics.clone(), token.clone()));
    }
    Ok(tasks)
}

/// Runs the agent on the bound UDP `sockets` until `shutdown` resolves, then stops receiving,
/// sends what is queued and waits for the sinks to acknowledge it (within `shutdown_grace`).
///
/// Per-sink counters are pushed to `sink_metrics` in the order of `config.sinks`.
///
/// # Errors
///
/// When certificates cannot be loaded or sockets cannot be set up.
pub async fn run(
    mut config: Config,
    sockets: Vec<std::net::UdpSocket>,
    metrics: Arc<Metrics>,
    sink_metrics: &mut Vec<Arc<SinkMetrics>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    routes::skip_ended(&mut config, std::time::SystemTime::now())?;
    let metrics_listener = runtime::observe::bind(&config.observe).map_err(Error::Metrics)?;
    let transport = Arc::new(config.quic.transport_config());
    let endpoint = client_endpoint()?;
    let links::Links {
        mut links,
        mut intakes,
        queues,
        states,
        reloads,
        feeds,
    } = links::Links::start(&config, &endpoint, &transport, &metrics, sink_metrics)?;
    let table = routes::table(&config.sinks);
    let mut endings = JoinSet::new();
    for feed in feeds {
        endings.spawn(routes::end_at_not_after(feed, table.clone()));
    }
    let (ingest_tx, ingest_rx) = mpsc::channel(INGEST_QUEUE);
    let batcher = tokio::spawn(batch::batch_loop(
        ingest_rx,
        queues,
        table.subscribe(),
        batch::Settings {
            // A session per run: sinks de-duplicate resends within a session.
            session: rand::random(),
            batch_bytes: config.batch_bytes,
            batch_delay: config.batch_delay,
        },
        metrics.clone(),
    ));
    let token = CancellationToken::new();
    // Should start-up fail below, the receive threads already started stop too.
    let _stop_receiving = token.clone().drop_guard();
    let receiving = receive::spawn_all(sockets, &ingest_tx, &config, &metrics, &token)
        .map_err(Error::Socket)?;
    drop(ingest_tx);
    let status = Arc::new(status::AgentStatus {
        metrics: metrics.clone(),
        sinks: states,
        listen: receiving.listening,
        receiving: AtomicBool::new(true),
    });
    let addrs = config.sinks.iter().map(|sink| sink.addr.clone()).collect();
    let routes_reload = routes::RoutesReload::new(config.source.clone(), addrs, table);
    let reloading = runtime::reload::spawn(
        config.reload.interval(),
        token.clone(),
        (reloads, routes_reload),
    )
    .map_err(Error::Socket)?;
    // After the reload task, whose SIGHUP handler a renewal prompts.
    let renewing = start_renewals(&config, &metrics, &token)?;
    // Served until the very end, so a scrape during the drain still answers.
    let observing = CancellationToken::new();
    let _ = metrics_listener
        .map(|listener| runtime::observe::spawn(listener, status.clone(), observing.clone()))
        .transpose()
        .map_err(|e| Error::Metrics(e.to_string()))?;

    shutdown.await;
    // A feed that would end during the drain ends with the rest instead.
    endings.abort_all();
    status.receiving.store(false, Ordering::Relaxed);
    token.cancel();
    for thread in receiving.threads {
        // Each notices the cancellation within receive::CANCEL_CHECK.
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    for task in receiving.tasks {
        let _ = task.await;
    }
    let _ = reloading.await;
    renewing.close();
    renewing.wait().await;
    // The receive loops held the last ingest senders: the batcher now flushes and ends, which
    // closes the sinks' queues; each backlog takes the rest and closes, and each link sends
    // what is left and waits for its acks.
    let _ = batcher.await;
    while intakes.join_next().await.is_some() {}
    drain_links(&mut links, config.shutdown_grace).await;
    endpoint.close(VarInt::from_u32(0), b"agent shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    log_summary(&config, sink_metrics, &metrics);
    observing.cancel();
    Ok(())
}

/// The QUIC endpoint every sink's link connects from, on a socket of its own with room for
/// bursts both ways.
fn client_endpoint() -> Result<quinn::Endpoint, Error> {
    let socket = udp::bind_client(Buffers {
        recv: Some(4 << 20),
        send: Some(8 << 20),
    })
    .map_err(Error::Socket)?;
    runtime::quic::endpoint(socket, None, None).map_err(|e| Error::Quic(e.to_string()))
}

/// Waits for the links to send what is left and see it acknowledged, at most `grace`; then
/// stops them (what is unacknowledged stays in the spool, if there is one).
async fn drain_links(links: &mut JoinSet<()>, grace: Duration) {
    let drained = tokio::time::timeout(grace, async { while links.join_next().await.is_some() {} });
    if drained.await.is_err() {
        tracing::warn!(
            grace = ?grace,
            "shutdown grace period over: unacknowledged batches stay in the spool, or are lost without one"
        );
        links.abort_all();
    }
}

/// Logs each sink link's counters, then the agent's.
fn log_summary(config: &Config, sink_metrics: &[Arc<SinkMetrics>], metrics: &Metrics) {
    for (sink, m) in config.sinks.iter().zip(sink_metrics.iter()) {
        let sink_queue_full = m.dropped(DropReason::SinkQueueFull).get();
        tracing::info!(
            sink = %sink.addr,
            datagrams_sent = m.datagrams_sent.get(),
            batches_sent = m.batches_sent.get(),
            datagrams_acknowledged = m.datagrams_acknowledged.get(),
            dropped_queue_full = sink_queue_full,
            dropped_backlog_full = m.dropped_total() - sink_queue_full,
            batches_resent = m.batches_resent.get(),
            unacknowledged_batches = m.backlog_batches.get(),
            spool_bytes = m.spool_bytes.get(),
            spool_write_errors = m.spool_write_errors.get(),
            connects = m.connects.get(),
            connect_failures = m.connect_failures_total(),
            fallbacks_to_grpc = m.fallbacks_to_grpc.get(),
            returns_to_quic = m.returns_to_quic.get(),
            "sink link summary"
        );
    }
    tracing::info!(
        datagrams_received = metrics.datagrams_received.get(),
        dropped_queue_full = metrics.dropped_queue_full.get(),
        batches = metrics.batches.get(),
        "agent stopped"
    );
}

/// Binds each listen address with the configured receive buffer.
///
/// # Errors
///
/// When an address cannot be bound; the error names it.
pub fn bind_listeners(config: &Config) -> Result<Vec<std::net::UdpSocket>, String> {
    config
        .listen
        .iter()
        .map(|addr| {
            udp::bind(
                *addr,
                Buffers {
                    recv: Some(config.recv_buffer),
                    send: None,
                },
            )
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
        })
        .collect()
}

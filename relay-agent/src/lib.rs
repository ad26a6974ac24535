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
//! - `batch`: batching and fan-out to the sinks' queues.
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
pub mod metrics;
mod receive;
mod spool;
mod status;
mod transport;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

pub use config::{Args, Config};
use metrics::DropReason;
pub use metrics::{Metrics, SinkMetrics};
use quinn::VarInt;
use runtime::ratelimit::RateLimit;
use runtime::reload::Prompt;
use runtime::udp::{self, Buffers};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Chunks (the datagrams of one receive call, at most `udp::RECV_BATCH`) queued between the
/// receive loops and the batcher.
const INGEST_QUEUE: usize = 1024;

/// Batches queued between the batcher and a sink's backlog: the backlog takes them at once
/// (a disk write at most), so a little room for a slow write is all this needs.
const INTAKE_QUEUE: usize = 256;

/// Takes a sink's batches from the batcher into its backlog (and spool), so that neither the
/// batcher nor other sinks ever wait on this sink's disk or network.
async fn intake(mut queue: mpsc::Receiver<batch::Frame>, backlog: Arc<backlog::Backlog>) {
    while let Some(frame) = queue.recv().await {
        backlog.append(frame);
    }
    backlog.close();
}

/// A sink's folder in the spool directory: its address, made safe as a file name.
fn spool_name(addr: &str) -> String {
    addr.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// One sink's certificate files, checked again on SIGHUP and every `--cert-reload-interval`.
struct Reload {
    sink: String,
    reloader: certs::Reloader,
    credentials: Arc<transport::Credentials>,
    certificate_not_after: Arc<AtomicI64>,
}

impl Reload {
    /// Checks the files; a new valid set is used from the link's next connection.
    fn check(&mut self, prompt: Prompt, transport: &Arc<quinn::TransportConfig>) {
        let checked = match prompt {
            Prompt::Signal => self.reloader.force().map(Some),
            Prompt::Poll => self.reloader.check(),
        };
        let loaded = match checked {
            Ok(Some(loaded)) => loaded,
            Ok(None) => return,
            Err(error) => {
                tracing::error!(sink = %self.sink, prompt = prompt.as_str(), %error, "certificate reload refused: the certificate in use stays");
                return;
            }
        };
        if let Err(error) = self.credentials.replace(&loaded, transport) {
            tracing::error!(sink = %self.sink, %error, "certificate reload refused: the certificate in use stays");
            return;
        }
        let info = loaded.identity.info();
        self.certificate_not_after
            .store(info.not_after.unix_timestamp(), Ordering::Relaxed);
        tracing::info!(
            sink = %self.sink,
            prompt = prompt.as_str(),
            identity = loaded.identity.name(),
            serial = %info.serial,
            expires = %certs::inspect::rfc3339(info.not_after),
            "certificates reloaded: the next connection to the sink uses them"
        );
    }
}

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
    config: Config,
    sockets: Vec<std::net::UdpSocket>,
    metrics: Arc<Metrics>,
    sink_metrics: &mut Vec<Arc<SinkMetrics>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let metrics_listener = runtime::observe::bind(&config.observe).map_err(Error::Metrics)?;
    let transport = Arc::new(config.quic.transport_config());
    let client_socket = udp::bind_client(Buffers {
        recv: Some(4 << 20),
        send: Some(8 << 20),
    })
    .map_err(Error::Socket)?;
    let endpoint = runtime::quic::endpoint(client_socket, None, None)
        .map_err(|e| Error::Quic(e.to_string()))?;
    let session: u64 = rand::random();

    let mut links = JoinSet::new();
    let mut intakes = JoinSet::new();
    let mut queues = Vec::with_capacity(config.sinks.len());
    let mut sink_states = Vec::with_capacity(config.sinks.len());
    let mut reloads = Vec::with_capacity(config.sinks.len());
    for sink in &config.sinks {
        let files = certs::TlsFiles {
            ca: sink.ca.clone(),
            cert: sink.cert.clone(),
            key: sink.key.clone(),
        };
        let (reloader, loaded, chained) = certs::Reloader::open(files, certs::Role::Agent)
            .map_err(|e| Error::Certs(sink.addr.clone(), e))?;
        if !chained {
            tracing::info!(sink = %sink.addr, cert = %sink.cert.display(), ca = %sink.ca.display(), "this agent's certificate is not issued by the CA it checks the sink against; reloads will not check its chain");
        }
        let identity = loaded.identity.clone();
        let credentials = Arc::new(
            transport::Credentials::new(&loaded, &transport)
                .map_err(|e| Error::Config(sink.addr.clone(), e.to_string()))?,
        );
        tracing::info!(
            sink = %sink.addr,
            transport = sink.transport.as_str(),
            server_name = %sink.server_name,
            identity = identity.name(),
            expires_in_days = identity.info().seconds_to_expiry() / 86_400,
            "relaying to sink"
        );
        let (tx, rx) = mpsc::channel(INTAKE_QUEUE);
        let link_metrics = Arc::new(metrics.for_sink(&sink.addr));
        sink_metrics.push(link_metrics.clone());
        let certificate_not_after =
            Arc::new(AtomicI64::new(identity.info().not_after.unix_timestamp()));
        sink_states.push(status::SinkState {
            addr: sink.addr.clone(),
            metrics: link_metrics.clone(),
            spool_max_bytes: config.spool_dir.as_ref().map(|_| config.spool_max_bytes),
            certificate_not_after: certificate_not_after.clone(),
        });
        reloads.push(Reload {
            sink: sink.addr.clone(),
            reloader,
            credentials: credentials.clone(),
            certificate_not_after,
        });
        let spool_dir = config
            .spool_dir
            .as_ref()
            .map(|dir| dir.join(spool_name(&sink.addr)));
        let backlog = Arc::new(
            backlog::Backlog::open(
                &sink.addr,
                spool_dir.as_deref(),
                backlog::Limits {
                    memory_bytes: sink.backlog_bytes,
                    spool_max_bytes: config.spool_max_bytes,
                    spool_max_age: config.spool_max_age,
                },
                link_metrics.clone(),
            )
            .map_err(|e| {
                Error::Spool(
                    spool_dir
                        .as_deref()
                        .unwrap_or(std::path::Path::new(""))
                        .display()
                        .to_string(),
                    e,
                )
            })?,
        );
        intakes.spawn(intake(rx, backlog.clone()));
        queues.push(batch::SinkQueue {
            name: sink.addr.clone(),
            queue: tx,
            metrics: link_metrics.clone(),
            full: RateLimit::new(Duration::from_secs(10)),
        });
        let quic = transport::quic::Connector {
            endpoint: endpoint.clone(),
            tls: credentials.clone(),
            sink: sink.clone(),
            metrics: link_metrics.clone(),
        };
        let grpc = transport::grpc::Connector::new(sink.clone(), credentials, config.grpc.clone())
            .map_err(|e| Error::Config(sink.addr.clone(), e.to_string()))?;
        links.spawn(
            transport::Link {
                dialer: transport::Dialer {
                    sink: sink.clone(),
                    quic: Arc::new(quic),
                    grpc: Arc::new(grpc),
                    metrics: link_metrics.clone(),
                    connect_timeout: config.connect_timeout,
                    quic_fallback_after: config.quic_fallback_after,
                    quic_retry_interval: config.quic_retry_interval,
                },
                backlog,
                backoff: transport::Backoff::new(config.reconnect_min, config.reconnect_max),
                window_bytes: config.window_bytes,
                released: 0,
                sent_through: 0,
                live_rate: transport::LiveRate::default(),
            }
            .run(),
        );
    }

    let (ingest_tx, ingest_rx) = mpsc::channel(INGEST_QUEUE);
    let batcher = tokio::spawn(batch::batch_loop(
        ingest_rx,
        queues,
        session,
        config.batch_bytes,
        config.batch_delay,
        config.compression,
        metrics.clone(),
    ));
    let token = CancellationToken::new();
    // Should start-up fail below, the receive threads already started stop too.
    let _stop_receiving = token.clone().drop_guard();
    let mut receivers = Vec::with_capacity(sockets.len());
    let mut listening = Vec::with_capacity(sockets.len());
    for socket in sockets {
        let listen = socket.local_addr().map_err(Error::Socket)?;
        tracing::info!(
            %listen,
            accept = config.admission.accept().as_str(),
            allow_sources = %config.admission.allow_display(),
            "receiving sFlow"
        );
        listening.push((
            listen,
            metrics
                .kernel_drops
                .with_label_values(&[&listen.to_string()]),
        ));
        let receiver = receive::Receiver {
            batcher: ingest_tx.clone(),
            metrics: metrics.clone(),
            admission: config.admission.clone(),
            coalesce: config.recv_coalesce,
        };
        let token = token.clone();
        let thread = std::thread::Builder::new()
            .name("relay-recv".into())
            .spawn(move || receive::receive_loop(socket, receiver, token))
            .map_err(Error::Socket)?;
        receivers.push(thread);
    }
    drop(ingest_tx);
    let status = Arc::new(status::AgentStatus {
        metrics: metrics.clone(),
        sinks: sink_states,
        listen: listening,
        receiving: AtomicBool::new(true),
    });
    // Served until the very end, so a scrape during the drain still answers.
    let observing = CancellationToken::new();
    let reloading = {
        let transport = transport.clone();
        runtime::reload::spawn(config.reload.interval(), token.clone(), move |prompt| {
            for reload in &mut reloads {
                reload.check(prompt, &transport);
            }
        })
        .map_err(Error::Socket)?
    };
    let _ = metrics_listener
        .map(|listener| runtime::observe::spawn(listener, status.clone(), observing.clone()))
        .transpose()
        .map_err(|e| Error::Metrics(e.to_string()))?;

    shutdown.await;
    status.receiving.store(false, Ordering::Relaxed);
    token.cancel();
    for thread in receivers {
        // Each notices the cancellation within receive::CANCEL_CHECK.
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    let _ = reloading.await;
    // The receive loops held the last ingest senders: the batcher now flushes and ends, which
    // closes the sinks' queues; each backlog takes the rest and closes, and each link sends
    // what is left and waits for its acks.
    let _ = batcher.await;
    while intakes.join_next().await.is_some() {}
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while links.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::warn!(
            grace = ?config.shutdown_grace,
            "shutdown grace period over: unacknowledged batches stay in the spool, or are lost without one"
        );
        links.abort_all();
    }
    endpoint.close(VarInt::from_u32(0), b"agent shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
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
    observing.cancel();
    Ok(())
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

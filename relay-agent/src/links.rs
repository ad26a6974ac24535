//! Each configured sink's side of the agent, set up at start: its credentials (and their
//! reload), its backlog (and spool), the intake task between the batcher and the backlog, and
//! the link task that sends to the sink, resends and reconnects.
//!
//! What a link does once running is `transport`'s; what the backlog keeps is `backlog`'s. This
//! module only wires one sink's parts together, in the order a failure is best reported in
//! (certificates first, then the spool directory, then the sink's settings).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::time::Duration;

use runtime::ratelimit::RateLimit;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::config::{Config, SinkConfig};
use crate::metrics::{Metrics, SinkMetrics};
use crate::reload::SinkReload;
use crate::routes::{self, Feed};
use crate::{Error, backlog, batch, status, transport};

/// Batches queued between the batcher and a sink's backlog: the backlog takes them at once
/// (a disk write at most), so a little room for a slow write is all this needs.
const INTAKE_QUEUE: usize = 256;

/// The running parts of every sink, in the order of `config.sinks`.
pub(crate) struct Links {
    /// Each sink's link task (send, resend, reconnect); they end once their backlog is closed
    /// and acknowledged.
    pub(crate) links: JoinSet<()>,
    /// Each sink's intake task (batcher → backlog); they end when the batcher does.
    pub(crate) intakes: JoinSet<()>,
    /// The batcher's queue to each sink.
    pub(crate) queues: Vec<batch::SinkQueue>,
    /// What the observability endpoint shows of each sink.
    pub(crate) states: Vec<status::SinkState>,
    /// Each sink's certificate files, checked again on SIGHUP and every poll interval.
    pub(crate) reloads: Vec<SinkReload>,
    /// What ending each sink's feed (at its `not-after`) takes away.
    pub(crate) feeds: Vec<Feed>,
}

impl Links {
    /// Loads each sink's credentials, opens its backlog and starts its intake and link tasks.
    /// Each sink's counters are pushed to `sink_metrics`.
    ///
    /// # Errors
    ///
    /// When a sink's certificates cannot be loaded, its spool cannot be opened or its
    /// settings cannot work.
    pub(crate) fn start(
        config: &Config,
        endpoint: &quinn::Endpoint,
        transport: &Arc<quinn::TransportConfig>,
        metrics: &Metrics,
        sink_metrics: &mut Vec<Arc<SinkMetrics>>,
    ) -> Result<Self, Error> {
        let n = config.sinks.len();
        let mut links = Self {
            links: JoinSet::new(),
            intakes: JoinSet::new(),
            queues: Vec::with_capacity(n),
            states: Vec::with_capacity(n),
            reloads: Vec::with_capacity(n),
            feeds: Vec::with_capacity(n),
        };
        for (index, sink) in config.sinks.iter().enumerate() {
            let (reloader, credentials, not_after) = load_credentials(sink, transport)?;
            let link_metrics = Arc::new(metrics.for_sink(&sink.addr));
            sink_metrics.push(link_metrics.clone());
            let certificate_not_after = Arc::new(AtomicI64::new(not_after));
            let ended = Arc::new(AtomicBool::new(false));
            links.states.push(status::SinkState {
                addr: sink.addr.clone(),
                metrics: link_metrics.clone(),
                spool_max_bytes: config.spool_dir.as_ref().map(|_| config.spool_max_bytes),
                certificate_not_after: certificate_not_after.clone(),
                ended: ended.clone(),
            });
            links.reloads.push(SinkReload {
                sink: sink.addr.clone(),
                reloader,
                credentials: credentials.clone(),
                transport: transport.clone(),
                certificate_not_after,
            });
            let spool_dir =
                (config.spool_dir.as_deref()).map(|dir| routes::spool_dir(dir, &sink.addr));
            let backlog = Arc::new(open_backlog(
                config,
                sink,
                spool_dir.as_ref(),
                link_metrics.clone(),
            )?);
            let (tx, rx) = mpsc::channel(INTAKE_QUEUE);
            let intake = links.intakes.spawn(intake(
                rx,
                backlog.clone(),
                transport::compressor(config.compression),
            ));
            links.queues.push(batch::SinkQueue {
                name: sink.addr.clone(),
                queue: tx,
                metrics: link_metrics.clone(),
                full: RateLimit::new(Duration::from_secs(10)),
            });
            let link = link(
                config,
                sink,
                endpoint,
                credentials,
                backlog.clone(),
                link_metrics.clone(),
                metrics.frame_bytes.clone(),
            )?;
            links.feeds.push(Feed {
                index,
                addr: sink.addr.clone(),
                link: links.links.spawn(link.run()),
                intake,
                backlog,
                spool_dir,
                metrics: link_metrics,
                ended,
            });
        }
        Ok(links)
    }
}

/// Opens the sink's certificate files: the reloader that watches them, the credentials the
/// link connects with, and the certificate's expiry (Unix seconds). Logs the sink.
fn load_credentials(
    sink: &SinkConfig,
    transport: &Arc<quinn::TransportConfig>,
) -> Result<(certs::Reloader, Arc<transport::Credentials>, i64), Error> {
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
        transport::Credentials::new(&loaded, transport)
            .map_err(|e| Error::Config(sink.addr.clone(), e.to_string()))?,
    );
    tracing::info!(
        sink = %sink.addr,
        transport = sink.transport.as_str(),
        server_name = %sink.server_name,
        identity = identity.name(),
        expires_in_days = identity.info().seconds_to_expiry() / 86_400,
        route = %sink.route.describe(),
        not_after = sink.route.not_after().map_or("never", |end| end.as_str()),
        "relaying to sink"
    );
    Ok((
        reloader,
        credentials,
        identity.info().not_after.unix_timestamp(),
    ))
}

/// The sink's backlog, with its spool in `spool_dir`, a folder of its own under
/// `--spool-dir` (if set).
fn open_backlog(
    config: &Config,
    sink: &SinkConfig,
    spool_dir: Option<&PathBuf>,
    metrics: Arc<SinkMetrics>,
) -> Result<backlog::Backlog, Error> {
    let limits = backlog::Limits {
        memory_bytes: sink.backlog_bytes,
        spool_max_bytes: config.spool_max_bytes,
        spool_max_age: config.spool_max_age,
    };
    backlog::Backlog::open(&sink.addr, spool_dir.map(PathBuf::as_path), limits, metrics).map_err(
        |e| {
            Error::Spool(
                spool_dir
                    .map_or(std::path::Path::new(""), PathBuf::as_path)
                    .display()
                    .to_string(),
                e,
            )
        },
    )
}

/// The sink's link: QUIC and gRPC connectors with its credentials, over its backlog.
fn link(
    config: &Config,
    sink: &SinkConfig,
    endpoint: &quinn::Endpoint,
    credentials: Arc<transport::Credentials>,
    backlog: Arc<backlog::Backlog>,
    metrics: Arc<SinkMetrics>,
    frame_bytes: prometheus::IntCounter,
) -> Result<transport::Link, Error> {
    let quic = transport::quic::Connector {
        endpoint: endpoint.clone(),
        tls: credentials.clone(),
        sink: sink.clone(),
        metrics: metrics.clone(),
    };
    let grpc = transport::grpc::Connector::new(sink.clone(), credentials, config.grpc.clone())
        .map_err(|e| Error::Config(sink.addr.clone(), e.to_string()))?;
    Ok(transport::Link {
        dialer: transport::Dialer {
            sink: sink.clone(),
            quic: Arc::new(quic),
            grpc: Arc::new(grpc),
            metrics,
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
        compressor: transport::compressor(config.compression),
        frame_bytes,
    })
}

/// Takes a sink's batches from the batcher into its backlog (and spool), so that neither the
/// batcher nor other sinks ever wait on this sink's disk or network.
///
/// Batches come plain: the link compresses what it sends against its connection's history.
/// While the link has no connection, though, batches wait in the backlog, in memory and on
/// disk, for as long as the sink is away; those are compressed here, each on its own, so that
/// an outage fills the backlog at the compressed size (`compressor`: `None` with
/// `--compression none`).
async fn intake(
    mut queue: mpsc::Receiver<batch::Frame>,
    backlog: Arc<backlog::Backlog>,
    mut compressor: Option<proto::compression::Compressor>,
) {
    while let Some(mut frame) = queue.recv().await {
        if let Some(compressor) = compressor.as_mut().filter(|_| !backlog.is_sending()) {
            match compressor.compress_frame(&frame.bytes, false) {
                Ok(bytes) => frame.bytes = bytes,
                Err(error) => tracing::warn!(%error, "batch compression failed: kept uncompressed"),
            }
        }
        backlog.append(frame);
    }
    backlog.close();
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};
    use prost::Message;
    use proto::pb;

    use super::*;

    fn frame(sequence: u64) -> batch::Frame {
        let batch = pb::Batch {
            session: 1,
            sequence,
            datagrams: vec![
                pb::Datagram {
                    payload: Bytes::from(vec![sequence as u8; 1_000]),
                    ..Default::default()
                };
                4
            ],
            ..Default::default()
        };
        let mut bytes = BytesMut::new();
        proto::wire::encode_frame(&batch, &mut bytes);
        batch::Frame {
            session: 1,
            sequence,
            datagrams: 4,
            bytes: bytes.freeze(),
        }
    }

    fn compressed(record: &backlog::Record) -> bool {
        let batch = pb::Batch::decode(&record.bytes[proto::wire::FRAME_HEADER_LEN..]).unwrap();
        !batch.zstd_datagrams.is_empty()
    }

    #[tokio::test]
    async fn batches_that_wait_for_a_connection_are_kept_compressed() {
        let limits = backlog::Limits {
            memory_bytes: 1 << 20,
            spool_max_bytes: 0,
            spool_max_age: Duration::from_secs(60),
        };
        let backlog = Arc::new(backlog::Backlog::open("s", None, limits, Arc::default()).unwrap());
        let (tx, rx) = mpsc::channel(8);
        let task = tokio::spawn(intake(
            rx,
            backlog.clone(),
            transport::compressor(Some(proto::compression::DEFAULT_LEVEL)),
        ));
        // No connection: the batch waits, compressed.
        tx.send(frame(1)).await.unwrap();
        let waiting = backlog.next_after(0).await.unwrap();
        assert!(compressed(&waiting));
        assert!(waiting.bytes.len() < frame(1).bytes.len() / 4);
        // Connected: plain, for the link to compress against its connection's history.
        backlog.set_sending(true);
        tx.send(frame(2)).await.unwrap();
        let sent_soon = backlog.next_after(waiting.id).await.unwrap();
        assert!(!compressed(&sent_soon));
        assert_eq!(sent_soon.bytes, frame(2).bytes);
        drop(tx);
        task.await.unwrap();
    }
}

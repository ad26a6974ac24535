//! The QUIC transport: one connection per session (mutual TLS, ALPN `sflow-relay/1`), one
//! bidirectional stream on it; length-prefixed batch frames out, acknowledgement frames in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::pb;
use proto::wire::FrameReader;
use quinn::{Connection, Endpoint, SendStream, VarInt};
use tokio::sync::watch;
use tokio_rustls::rustls::pki_types::CertificateDer;

use super::{Acked, MAX_ACK_LEN, acknowledged, explain, resolve};
use crate::config::SinkConfig;
use crate::metrics::SinkMetrics;
use bytes::Bytes;

/// Opens QUIC sessions to one sink.
#[derive(Debug)]
pub(crate) struct Connector {
    pub(crate) endpoint: Endpoint,
    pub(crate) tls: Arc<super::Credentials>,
    pub(crate) sink: SinkConfig,
    pub(crate) metrics: Arc<SinkMetrics>,
}

impl Connector {
    pub(crate) fn sink_addr(&self) -> &str {
        &self.sink.addr
    }

    /// Connects (within `timeout`) and opens the stream.
    pub(crate) async fn connect(&self, timeout: Duration) -> Result<super::Session, String> {
        let addr = resolve(&self.sink.addr).await?;
        let connecting = self
            .endpoint
            .connect_with((*self.tls.quic.get()).clone(), addr, &self.sink.server_name)
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let connection = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => return Err(explain(&self.sink, &error.to_string())),
            Err(_) => return Err(format!("no QUIC handshake with {addr} within {timeout:?}")),
        };
        let accepts_zstd = connection
            .handshake_data()
            .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|data| data.protocol)
            .is_some_and(|alpn| alpn == proto::ALPN_ZSTD);
        let (send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| explain(&self.sink, &e.to_string()))?;
        let (acked_tx, acked) = watch::channel(Acked::default());
        let metrics = self.metrics.clone();
        let stats_of = connection.clone();
        tokio::spawn(async move {
            let mut reader = FrameReader::new(recv, MAX_ACK_LEN);
            // The connection's UDP bytes are counted as of each acknowledgement (one per
            // batch), and once more when the session ends.
            let mut udp_bytes_counted = 0;
            let mut count = |connection: &Connection| {
                let sent = connection.stats().udp_tx.bytes;
                metrics
                    .quic_udp_bytes_sent
                    .inc_by(sent.saturating_sub(udp_bytes_counted));
                udp_bytes_counted = udp_bytes_counted.max(sent);
            };
            while let Ok(Some(ack)) = reader.next::<pb::Ack>().await {
                acknowledged(&acked_tx, &ack);
                count(&stats_of);
                metrics.rtt.set(stats_of.rtt().as_secs_f64());
            }
            count(&stats_of);
        });
        Ok(super::Session::Quic(Session {
            connection,
            send,
            acked,
            sink: self.sink.clone(),
            accepts_zstd,
        }))
    }
}

/// An open QUIC session.
#[derive(Debug)]
pub(crate) struct Session {
    connection: Connection,
    send: SendStream,
    acked: watch::Receiver<Acked>,
    sink: SinkConfig,
    /// The sink chose ALPN `proto::ALPN_ZSTD`: it takes compressed batches.
    pub(crate) accepts_zstd: bool,
}

impl Session {
    /// The certificate chain the sink presented.
    pub(crate) fn peer_chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.connection
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .map(|chain| *chain)
    }

    pub(crate) fn remote(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    pub(crate) fn acked(&self) -> watch::Receiver<Acked> {
        self.acked.clone()
    }

    /// Writes one frame (header and body).
    pub(crate) async fn send(&mut self, bytes: Bytes) -> Result<(), String> {
        if let Some(error) = self.connection.close_reason() {
            return Err(explain(&self.sink, &error.to_string()));
        }
        // A chunk is taken whole or not at all.
        self.send
            .write_chunk(bytes)
            .await
            .map_err(|e| e.to_string())
    }

    pub(crate) async fn broken(&self) -> String {
        explain(&self.sink, &self.connection.closed().await.to_string())
    }

    pub(crate) fn finish(&mut self) {
        let _ = self.send.finish();
    }

    pub(crate) fn close(self, reason: &str) {
        self.connection
            .close(VarInt::from_u32(0), reason.as_bytes());
    }
}

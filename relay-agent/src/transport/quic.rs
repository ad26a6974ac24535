//! The QUIC transport: one connection per session (mutual TLS, ALPN `sflow-relay/1` or one of
//! its compressed variants), one bidirectional stream on it; length-prefixed batch frames out,
//! acknowledgement frames in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::compression::Accepts;
use proto::pb;
use proto::wire::FrameReader;
use quinn::{Connection, ConnectionError, Endpoint, SendStream, TransportErrorCode, VarInt};
use tokio::sync::watch;
use tokio_rustls::rustls::AlertDescription;
use tokio_rustls::rustls::pki_types::CertificateDer;

use super::error::{FailureKind, Transport, TransportError};
use super::{Acked, BoxFuture, Dial, MAX_ACK_LEN, Wire, acknowledged, resolve};
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

impl Dial for Connector {
    fn connect(&self, timeout: Duration) -> BoxFuture<'_, Result<super::Session, TransportError>> {
        Box::pin(async move {
            let session = self.open(timeout).await?;
            Ok(super::Session::new(Transport::Quic, Box::new(session)))
        })
    }
}

impl Connector {
    /// Connects (within `timeout`) and opens the stream.
    async fn open(&self, timeout: Duration) -> Result<Session, TransportError> {
        let addr = resolve(&self.sink, Transport::Quic).await?;
        let connecting = self
            .endpoint
            .connect_with((*self.tls.quic.get()).clone(), addr, &self.sink.server_name)
            .map_err(|e| {
                TransportError::new(
                    FailureKind::Other,
                    Transport::Quic,
                    &self.sink,
                    format_args!("cannot connect to {addr}: {e}"),
                )
                .with_source(e)
            })?;
        let connection = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => return Err(failure(&self.sink, error)),
            Err(elapsed) => {
                return Err(TransportError::new(
                    FailureKind::Timeout,
                    Transport::Quic,
                    &self.sink,
                    format_args!("no QUIC handshake with {addr} within {timeout:?}"),
                )
                .with_source(elapsed));
            }
        };
        let alpn = connection
            .handshake_data()
            .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|data| data.protocol);
        let accepts = match alpn.as_deref() {
            Some(proto::ALPN_ZSTD_HISTORY) => Accepts::ZstdHistory,
            Some(proto::ALPN_ZSTD) => Accepts::Zstd,
            _ => Accepts::Plain,
        };
        let (send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| failure(&self.sink, e))?;
        let (acked_tx, acked) = watch::channel(Acked::default());
        tokio::spawn(read_acks(
            recv,
            connection.clone(),
            acked_tx,
            self.metrics.clone(),
        ));
        Ok(Session {
            connection,
            send,
            acked,
            sink: self.sink.clone(),
            accepts,
        })
    }
}

/// Reads the sink's acknowledgements until the stream ends. The connection's UDP bytes are
/// counted as of each acknowledgement (one per batch), and once more when the session ends.
async fn read_acks(
    recv: quinn::RecvStream,
    connection: Connection,
    acked: watch::Sender<Acked>,
    metrics: Arc<SinkMetrics>,
) {
    let mut reader = FrameReader::new(recv, MAX_ACK_LEN);
    let mut udp_bytes_counted = 0;
    let mut count = |connection: &Connection| {
        let sent = connection.stats().udp_tx.bytes;
        metrics
            .quic_udp_bytes_sent
            .inc_by(sent.saturating_sub(udp_bytes_counted));
        udp_bytes_counted = udp_bytes_counted.max(sent);
    };
    while let Ok(Some(ack)) = reader.next::<pb::Ack>().await {
        acknowledged(&acked, &ack);
        count(&connection);
        metrics.rtt.set(connection.rtt().as_secs_f64());
    }
    count(&connection);
}

/// A QUIC connection's failure, as a [`TransportError`].
fn failure(sink: &SinkConfig, error: ConnectionError) -> TransportError {
    TransportError::new(kind_of(&error), Transport::Quic, sink, &error).with_source(error)
}

/// What a QUIC connection's failure means. The sink's QUIC stack aborting the connection with
/// a TLS alert (or refusing it outright) is the sink refusing us; our own TLS failing with an
/// alert about the sink's certificate is us refusing the sink.
fn kind_of(error: &ConnectionError) -> FailureKind {
    let alert = |code: TransportErrorCode| {
        let code = u64::from(code);
        (0x100..=0x1ff)
            .contains(&code)
            .then(|| AlertDescription::from((code & 0xff) as u8))
    };
    match error {
        ConnectionError::ConnectionClosed(close) => {
            if alert(close.error_code).is_some()
                || close.error_code == TransportErrorCode::CONNECTION_REFUSED
            {
                FailureKind::RefusedBySink
            } else {
                FailureKind::Protocol
            }
        }
        ConnectionError::TransportError(error) => alert(error.code)
            .and_then(FailureKind::of_our_alert)
            .unwrap_or(FailureKind::Protocol),
        ConnectionError::TimedOut => FailureKind::Timeout,
        ConnectionError::ApplicationClosed(_)
        | ConnectionError::Reset
        | ConnectionError::VersionMismatch => FailureKind::Protocol,
        ConnectionError::LocallyClosed | ConnectionError::CidsExhausted => FailureKind::Other,
    }
}

/// An open QUIC session.
#[derive(Debug)]
pub(crate) struct Session {
    connection: Connection,
    send: SendStream,
    acked: watch::Receiver<Acked>,
    sink: SinkConfig,
    /// What the sink's choice of ALPN says it takes (`proto::ALPN_ZSTD_HISTORY`,
    /// `proto::ALPN_ZSTD`, or `proto::ALPN`).
    accepts: Accepts,
}

impl Wire for Session {
    /// The certificate chain the sink presented.
    fn peer_chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.connection
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .map(|chain| *chain)
    }

    fn remote(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    fn accepts(&self) -> Accepts {
        self.accepts
    }

    fn acked(&self) -> watch::Receiver<Acked> {
        self.acked.clone()
    }

    /// Writes one frame (header and body).
    fn send(&mut self, bytes: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            if let Some(error) = self.connection.close_reason() {
                return Err(failure(&self.sink, error));
            }
            // A chunk is taken whole or not at all.
            self.send.write_chunk(bytes).await.map_err(|e| match e {
                quinn::WriteError::ConnectionLost(lost) => failure(&self.sink, lost),
                other => {
                    TransportError::new(FailureKind::Protocol, Transport::Quic, &self.sink, &other)
                        .with_source(other)
                }
            })
        })
    }

    fn broken(&self) -> BoxFuture<'_, TransportError> {
        Box::pin(async move { failure(&self.sink, self.connection.closed().await) })
    }

    fn finish(&mut self) {
        let _ = self.send.finish();
    }

    fn close(self: Box<Self>, reason: &str) {
        self.connection
            .close(VarInt::from_u32(0), reason.as_bytes());
    }
}

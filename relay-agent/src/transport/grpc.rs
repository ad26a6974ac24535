//! The gRPC transport: the `Relay.Stream` call over HTTP/2 over TLS on TCP, for sites that let
//! no UDP out. Same certificates and the same TLS policy as QUIC (from `relay-certs`, ALPN
//! `h2`); same batches and acknowledgements.
//!
//! TLS is done here, in the connector tonic is given, so that tonic never builds a TLS
//! configuration of its own. The batches are sent as the frames the batcher already encoded
//! (once, for every sink), through a codec that copies their protobuf bodies as they are: the
//! gRPC message *is* the frame without its length prefix.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use hyper_util::rt::TokioIo;
use prost::Message;
use proto::compression::Accepts;
use proto::pb;
use runtime::grpc::{GrpcOptions, error_chain};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

use super::error::{FailureKind, Transport, TransportError, find_in_chain};
use super::{Acked, BoxFuture, Credentials, Dial, MAX_ACK_LEN, Wire, acknowledged, resolve};
use crate::config::SinkConfig;

/// Frames handed to the call and not yet taken by HTTP/2: a little slack, no more (what is
/// here is "in flight" and lost if the connection breaks).
const FRAMES_IN_CALL: usize = 4;

/// Opens gRPC sessions to one sink.
pub(crate) struct Connector {
    sink: SinkConfig,
    tls: Arc<Credentials>,
    server_name: ServerName<'static>,
    options: GrpcOptions,
}

impl Dial for Connector {
    /// Connects (TCP, TLS, HTTP/2) and starts the call, all within `timeout`.
    fn connect(&self, timeout: Duration) -> BoxFuture<'_, Result<super::Session, TransportError>> {
        Box::pin(async move {
            match tokio::time::timeout(timeout, self.open()).await {
                Ok(result) => {
                    result.map(|session| super::Session::new(Transport::Grpc, Box::new(session)))
                }
                Err(elapsed) => Err(TransportError::new(
                    FailureKind::Timeout,
                    Transport::Grpc,
                    &self.sink,
                    format_args!(
                        "no gRPC connection to {} within {timeout:?}",
                        self.sink.addr
                    ),
                )
                .with_source(elapsed)),
            }
        })
    }
}

impl Connector {
    /// `tls.grpc` must offer ALPN `h2` (see `proto::GRPC_ALPN`).
    pub(crate) fn new(
        sink: SinkConfig,
        tls: Arc<Credentials>,
        options: GrpcOptions,
    ) -> Result<Self, TransportError> {
        let server_name = ServerName::try_from(sink.server_name.clone()).map_err(|e| {
            TransportError::new(
                FailureKind::Other,
                Transport::Grpc,
                &sink,
                format_args!("server name {:?}: {e}", sink.server_name),
            )
            .with_source(e)
        })?;
        Ok(Self {
            sink,
            tls,
            server_name,
            options,
        })
    }

    /// Opens the channel and starts the call.
    async fn open(&self) -> Result<Session, TransportError> {
        let remote = resolve(&self.sink, Transport::Grpc).await?;
        let handshake = Handshake::default();
        let channel = self
            .channel(remote, &handshake)
            .await
            .map_err(|e| handshake.failure(&self.sink, error_chain(&e), e))?;
        let (frames, outgoing) = mpsc::channel(FRAMES_IN_CALL);
        let mut grpc =
            tonic::client::Grpc::new(channel.clone()).max_decoding_message_size(MAX_ACK_LEN);
        grpc.ready()
            .await
            .map_err(|e| handshake.failure(&self.sink, error_chain(&e), e))?;
        let response = grpc
            .streaming(
                tonic::Request::new(ReceiverStream::new(outgoing)),
                tonic::codegen::http::uri::PathAndQuery::from_static(proto::GRPC_STREAM_PATH),
                BatchCodec,
            )
            .await
            .map_err(|status| handshake.failure(&self.sink, describe(&status), status))?;
        let metadata = response.metadata();
        let history = proto::compression::HISTORY_LEN.to_string();
        let accepts = if metadata
            .get(proto::GRPC_HISTORY_HEADER)
            .is_some_and(|v| v == history.as_str())
        {
            Accepts::ZstdHistory
        } else if metadata
            .get(proto::GRPC_COMPRESSION_HEADER)
            .is_some_and(|v| v == "zstd")
        {
            Accepts::Zstd
        } else {
            Accepts::Plain
        };
        let (acked_tx, acked) = watch::channel(Acked::default());
        let (ended_tx, ended) = watch::channel(None);
        tokio::spawn(read_acks(response.into_inner(), acked_tx, ended_tx));
        Ok(Session {
            frames: Some(frames),
            acked,
            ended,
            remote,
            peer_chain: handshake.take_chain(),
            sink: self.sink.clone(),
            accepts,
            _channel: channel,
        })
    }

    /// Connects the channel: TCP, then TLS here (noting in `handshake` that it completed and
    /// the chain the sink presented), then HTTP/2.
    async fn channel(
        &self,
        remote: SocketAddr,
        handshake: &Handshake,
    ) -> Result<Channel, tonic::transport::Error> {
        // The configuration current now: a certificate reload applies from the next connection.
        let tls = TlsConnector::from(self.tls.grpc.get());
        let name = self.server_name.clone();
        let (done, chain) = (handshake.done.clone(), handshake.chain.clone());
        let connector = tower::service_fn(move |_: Uri| {
            let (tls, name, done, chain) = (tls.clone(), name.clone(), done.clone(), chain.clone());
            async move {
                let tcp = TcpStream::connect(remote).await?;
                tcp.set_nodelay(true)?;
                let stream = tls.connect(name, tcp).await?;
                done.store(true, Ordering::Relaxed);
                *chain.lock().unwrap_or_else(|p| p.into_inner()) =
                    stream.get_ref().1.peer_certificates().map(<[_]>::to_vec);
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        // The scheme is `http` because TLS is the connector's business, not tonic's; the
        // connection is TLS all the same.
        Endpoint::from_shared(format!("http://{}", self.sink.addr))?
            .http2_keep_alive_interval(self.options.keep_alive())
            .keep_alive_timeout(self.options.keep_alive_timeout())
            .keep_alive_while_idle(true)
            .initial_stream_window_size(runtime::grpc::DEFAULT_STREAM_WINDOW)
            .initial_connection_window_size(runtime::grpc::DEFAULT_CONN_WINDOW)
            .connect_with_connector(connector)
            .await
    }
}

/// What the TLS connector saw of one connection attempt.
#[derive(Debug, Default)]
struct Handshake {
    /// The TLS handshake completed (on our side).
    done: Arc<AtomicBool>,
    /// The certificate chain the sink presented.
    chain: Arc<std::sync::Mutex<Option<Vec<CertificateDer<'static>>>>>,
}

impl Handshake {
    fn take_chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.chain.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// A failure to open the call, `text` saying what it was and `source` the error.
    ///
    /// In TLS 1.3 the client's handshake is over before the server has checked the client's
    /// certificate; a sink that refuses it sends an alert and closes, and the alert is often
    /// lost to a write that fails first ("broken pipe"). Knowing the handshake completed
    /// tells that refusal apart from a network failure.
    fn failure(
        &self,
        sink: &SinkConfig,
        text: String,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> TransportError {
        let alert = matches!(
            find_in_chain::<rustls::Error>(&source),
            Some(rustls::Error::AlertReceived(_))
        );
        if self.done.load(Ordering::Relaxed) && !alert {
            TransportError::new(
                FailureKind::RefusedBySink,
                Transport::Grpc,
                sink,
                format_args!(
                    "the sink closed the connection right after the TLS handshake, as it does when it refuses a certificate (its log says why): {text}"
                ),
            )
        } else {
            let kind = kind_of(&source).unwrap_or(FailureKind::Other);
            TransportError::new(kind, Transport::Grpc, sink, text)
        }
        .with_source(source)
    }
}

/// What a gRPC failure means, when its chain of sources tells: a TLS alert from the sink or a
/// refusing status is the sink refusing us; a certificate error is our refusing the sink; a
/// socket error says whether the sink was reachable at all.
fn kind_of(error: &(dyn std::error::Error + 'static)) -> Option<FailureKind> {
    match find_in_chain::<rustls::Error>(error) {
        Some(rustls::Error::AlertReceived(_)) => return Some(FailureKind::RefusedBySink),
        Some(rustls::Error::InvalidCertificate(certificate)) => {
            return Some(FailureKind::of_certificate_error(certificate));
        }
        Some(_) => return Some(FailureKind::Protocol),
        None => {}
    }
    if let Some(status) = find_in_chain::<Status>(error)
        && matches!(
            status.code(),
            Code::PermissionDenied | Code::Unauthenticated
        )
    {
        return Some(FailureKind::RefusedBySink);
    }
    find_in_chain::<std::io::Error>(error)
        .map(FailureKind::of_io)
        .filter(|kind| *kind != FailureKind::Other)
}

/// Reads the sink's acknowledgements until the call ends, then says how it ended.
async fn read_acks(
    mut acks: tonic::Streaming<pb::Ack>,
    acked: watch::Sender<Acked>,
    ended: watch::Sender<Option<CallEnd>>,
) {
    let end = loop {
        match acks.message().await {
            Ok(Some(ack)) => acknowledged(&acked, &ack),
            Ok(None) => break CallEnd::Finished,
            Err(status) => break CallEnd::Failed(status),
        }
    };
    ended.send_replace(Some(end));
}

/// How a call ended.
#[derive(Debug, Clone)]
enum CallEnd {
    /// The sink ended it.
    Finished,
    /// With this status.
    Failed(Status),
}

/// A gRPC status with whatever caused it (a TLS alert, a reset), without tonic's debug dump.
fn describe(status: &Status) -> String {
    use std::error::Error;
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = status.source() {
        text.push_str(": ");
        text.push_str(&error_chain(source));
    }
    text
}

/// An open gRPC session: one `Relay.Stream` call.
pub(crate) struct Session {
    /// Frame bodies for the call; `None` once finished.
    frames: Option<mpsc::Sender<Bytes>>,
    acked: watch::Receiver<Acked>,
    /// How the call ended, once it has.
    ended: watch::Receiver<Option<CallEnd>>,
    remote: SocketAddr,
    /// The certificate chain the sink presented.
    peer_chain: Option<Vec<CertificateDer<'static>>>,
    sink: SinkConfig,
    /// What the sink's response headers say it takes (`proto::GRPC_HISTORY_HEADER`,
    /// `proto::GRPC_COMPRESSION_HEADER`).
    accepts: Accepts,
    _channel: Channel,
}

impl Session {
    /// Why the call ended.
    async fn ended(&self) -> TransportError {
        let mut ended = self.ended.clone();
        let end = match ended.wait_for(Option::is_some).await {
            Ok(end) => end.clone(),
            Err(_) => None,
        };
        match end {
            Some(CallEnd::Failed(status)) => {
                let kind = kind_of(&status).unwrap_or(FailureKind::Protocol);
                TransportError::new(kind, Transport::Grpc, &self.sink, describe(&status))
                    .with_source(status)
            }
            Some(CallEnd::Finished) => TransportError::new(
                FailureKind::Protocol,
                Transport::Grpc,
                &self.sink,
                "the sink ended the call",
            ),
            None => TransportError::new(
                FailureKind::Other,
                Transport::Grpc,
                &self.sink,
                "the call ended",
            ),
        }
    }
}

impl Wire for Session {
    fn peer_chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.peer_chain.clone()
    }

    fn remote(&self) -> SocketAddr {
        self.remote
    }

    fn accepts(&self) -> Accepts {
        self.accepts
    }

    fn acked(&self) -> watch::Receiver<Acked> {
        self.acked.clone()
    }

    /// Writes one frame's body (the call has its own framing).
    fn send(&mut self, frame: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let Some(frames) = &self.frames else {
                return Err(TransportError::new(
                    FailureKind::Other,
                    Transport::Grpc,
                    &self.sink,
                    "the call is finished",
                ));
            };
            let body = frame.slice(proto::wire::FRAME_HEADER_LEN..);
            if frames.send(body).await.is_ok() {
                Ok(())
            } else {
                Err(self.ended().await)
            }
        })
    }

    fn broken(&self) -> BoxFuture<'_, TransportError> {
        Box::pin(self.ended())
    }

    fn finish(&mut self) {
        self.frames = None;
    }

    fn close(self: Box<Self>, _reason: &str) {}
}

/// Batches out as pre-encoded bodies, acknowledgements in as protobuf.
#[derive(Debug, Clone, Copy)]
struct BatchCodec;

impl Codec for BatchCodec {
    type Encode = Bytes;
    type Decode = pb::Ack;
    type Encoder = BodyEncoder;
    type Decoder = AckDecoder;

    fn encoder(&mut self) -> BodyEncoder {
        BodyEncoder
    }

    fn decoder(&mut self) -> AckDecoder {
        AckDecoder
    }
}

#[derive(Debug)]
struct BodyEncoder;

impl Encoder for BodyEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, body: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&body);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        // Batches are 64 KiB by default: room for one and a half before the body yields.
        BufferSettings::new(128 * 1024, 96 * 1024)
    }
}

#[derive(Debug)]
struct AckDecoder;

impl Decoder for AckDecoder {
    type Item = pb::Ack;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<pb::Ack>, Status> {
        pb::Ack::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("malformed acknowledgement: {e}")))
    }
}

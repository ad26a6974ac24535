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
use proto::pb;
use runtime::grpc::{GrpcOptions, error_chain};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint, Uri};

use super::{Acked, Credentials, MAX_ACK_LEN, acknowledged, explain, resolve};
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

impl Connector {
    /// `tls.grpc` must offer ALPN `h2` (see `proto::GRPC_ALPN`).
    pub(crate) fn new(
        sink: SinkConfig,
        tls: Arc<Credentials>,
        options: GrpcOptions,
    ) -> Result<Self, String> {
        let server_name = ServerName::try_from(sink.server_name.clone())
            .map_err(|e| format!("server name {:?}: {e}", sink.server_name))?;
        Ok(Self {
            sink,
            tls,
            server_name,
            options,
        })
    }

    /// Connects (TCP, TLS, HTTP/2) and starts the call, all within `timeout`.
    pub(crate) async fn connect(&self, timeout: Duration) -> Result<super::Session, String> {
        match tokio::time::timeout(timeout, self.open()).await {
            Ok(result) => result.map(super::Session::Grpc),
            Err(_) => Err(format!(
                "no gRPC connection to {} within {timeout:?}",
                self.sink.addr
            )),
        }
    }

    async fn open(&self) -> Result<Session, String> {
        let remote = resolve(&self.sink.addr).await?;
        // The configuration current now: a certificate reload applies from the next connection.
        let tls = TlsConnector::from(self.tls.grpc.get());
        let name = self.server_name.clone();
        // In TLS 1.3 the client's handshake is over before the server has checked the client's
        // certificate; a sink that refuses it sends an alert and closes, and the alert is often
        // lost to a write that fails first ("broken pipe"). Knowing the handshake completed
        // tells that refusal apart from a network failure.
        let handshaken = Arc::new(AtomicBool::new(false));
        let done = handshaken.clone();
        let presented = Arc::new(std::sync::Mutex::new(None));
        let chain = presented.clone();
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
        let explain = |text: String| {
            if handshaken.load(Ordering::Relaxed) && !text.contains("fatal alert") {
                explain(
                    &self.sink,
                    &format!(
                        "the sink closed the connection right after the TLS handshake, as it does when it refuses a certificate (its log says why): {text}"
                    ),
                )
            } else {
                explain(&self.sink, &text)
            }
        };
        // The scheme is `http` because TLS is the connector's business, not tonic's; the
        // connection is TLS all the same.
        let channel = Endpoint::from_shared(format!("http://{}", self.sink.addr))
            .map_err(|e| format!("{}: {e}", self.sink.addr))?
            .http2_keep_alive_interval(self.options.keep_alive())
            .keep_alive_timeout(self.options.keep_alive_timeout())
            .keep_alive_while_idle(true)
            .initial_stream_window_size(runtime::grpc::DEFAULT_STREAM_WINDOW)
            .initial_connection_window_size(runtime::grpc::DEFAULT_CONN_WINDOW)
            .connect_with_connector(connector)
            .await
            .map_err(|e| explain(error_chain(&e)))?;
        let (frames, outgoing) = mpsc::channel(FRAMES_IN_CALL);
        let mut grpc =
            tonic::client::Grpc::new(channel.clone()).max_decoding_message_size(MAX_ACK_LEN);
        grpc.ready().await.map_err(|e| explain(error_chain(&e)))?;
        let response = grpc
            .streaming(
                tonic::Request::new(ReceiverStream::new(outgoing)),
                tonic::codegen::http::uri::PathAndQuery::from_static(proto::GRPC_STREAM_PATH),
                BatchCodec,
            )
            .await
            .map_err(|status| explain(describe(&status)))?;
        let accepts_zstd = response
            .metadata()
            .get(proto::GRPC_COMPRESSION_HEADER)
            .is_some_and(|v| v == "zstd");
        let mut acks = response.into_inner();
        let (acked_tx, acked) = watch::channel(Acked::default());
        let (ended_tx, ended) = watch::channel(None);
        tokio::spawn(async move {
            let reason = loop {
                match acks.message().await {
                    Ok(Some(ack)) => acknowledged(&acked_tx, &ack),
                    Ok(None) => break "the sink ended the call".to_owned(),
                    Err(status) => break describe(&status),
                }
            };
            ended_tx.send_replace(Some(reason));
        });
        Ok(Session {
            frames: Some(frames),
            acked,
            ended,
            remote,
            peer_chain: presented.lock().unwrap_or_else(|p| p.into_inner()).take(),
            sink: self.sink.clone(),
            accepts_zstd,
            _channel: channel,
        })
    }
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
    /// Why the call ended, once it has.
    ended: watch::Receiver<Option<String>>,
    remote: SocketAddr,
    /// The certificate chain the sink presented.
    peer_chain: Option<Vec<CertificateDer<'static>>>,
    sink: SinkConfig,
    /// The sink's response carried `proto::GRPC_COMPRESSION_HEADER: zstd`.
    pub(crate) accepts_zstd: bool,
    _channel: Channel,
}

impl Session {
    pub(crate) fn peer_chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.peer_chain.clone()
    }

    pub(crate) fn remote(&self) -> SocketAddr {
        self.remote
    }

    pub(crate) fn acked(&self) -> watch::Receiver<Acked> {
        self.acked.clone()
    }

    /// Writes one frame's body (the call has its own framing).
    pub(crate) async fn send(&mut self, frame: Bytes) -> Result<(), String> {
        let Some(frames) = &self.frames else {
            return Err("the call is finished".into());
        };
        let body = frame.slice(proto::wire::FRAME_HEADER_LEN..);
        if frames.send(body).await.is_ok() {
            Ok(())
        } else {
            Err(self.broken().await)
        }
    }

    pub(crate) async fn broken(&self) -> String {
        let mut ended = self.ended.clone();
        let reason = match ended.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the call ended".to_owned(),
        };
        explain(&self.sink, &reason)
    }

    pub(crate) fn finish(&mut self) {
        self.frames = None;
    }
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

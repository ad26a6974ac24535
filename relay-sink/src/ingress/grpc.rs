//! gRPC ingress: the `Relay.Stream` call over HTTP/2 over TLS on TCP, for agents whose site
//! lets no UDP out.
//!
//! TLS is ours, not tonic's: each TCP connection is handshaken here with the same rustls
//! configuration the QUIC side uses (from `relay-certs`, ALPN `h2` instead of the relay's), so
//! the mutual-TLS policy exists once. A refused handshake is counted and logged exactly as on
//! QUIC. Only connections that pass reach tonic, each carrying the agent's name from its
//! certificate, which the call handler reads from the request.
//!
//! Every batch goes through [`ingress::deliver`], the QUIC side's path to replay, and is
//! acknowledged on the response stream.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use proto::compression::Expander;
use proto::pb;
use proto::pb::relay_server::{Relay, RelayServer};
use runtime::reload::Swap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::Shared;
use crate::admission;
use crate::ingress::{self, AckWriter as _};
use crate::labels::Transport;
use crate::refusal::{self, HandshakeError, ProtocolError};
use crate::status::Registered;

const GRPC: Transport = Transport::Grpc;

/// Acknowledgements are tiny; the response stream needs little room.
const ACK_QUEUE: usize = 64;

/// Serves gRPC on `listener` until `token` is cancelled; then ends every call (so agents see
/// the stream close and reconnect elsewhere) and returns once connections are closed.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<Swap<rustls::ServerConfig>>,
    shared: Arc<Shared>,
    token: CancellationToken,
) {
    let (connections, incoming) = mpsc::channel::<AgentIo>(64);
    let handshakes = TaskTracker::new();
    let accept = tokio::spawn(accept(
        listener,
        tls,
        shared.clone(),
        connections,
        token.clone(),
        handshakes.clone(),
    ));
    let grpc = &shared.config.grpc;
    let service = RelayServer::new(RelayService {
        shared: shared.clone(),
        token: token.clone(),
    })
    // The limit is enforced on receipt, before the message is decoded.
    .max_decoding_message_size(shared.config.max_frame_bytes);
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(grpc.keep_alive()))
        .http2_keepalive_timeout(Some(grpc.keep_alive_timeout()))
        .initial_stream_window_size(runtime::grpc::DEFAULT_STREAM_WINDOW)
        .initial_connection_window_size(runtime::grpc::DEFAULT_CONN_WINDOW)
        // One call per connection is the protocol; a few more let a reconnecting agent's
        // new call in while an old one drains.
        .max_concurrent_streams(4)
        .serve_with_incoming_shutdown(
            service,
            ReceiverStream::new(incoming).map(Ok::<_, std::io::Error>),
            token.cancelled(),
        )
        .await;
    if let Err(error) = served {
        tracing::error!(error = %runtime::grpc::error_chain(&error), "gRPC server failed");
    }
    let _ = accept.await;
    handshakes.close();
    handshakes.wait().await;
}

/// Accepts TCP connections and handshakes each in its own task (a slow or silent client holds
/// up no one), passing those that pass to the server.
async fn accept(
    listener: TcpListener,
    tls: Arc<Swap<rustls::ServerConfig>>,
    shared: Arc<Shared>,
    connections: mpsc::Sender<AgentIo>,
    token: CancellationToken,
    handshakes: TaskTracker,
) {
    runtime::grpc::accept_until(&listener, &token, "grpc", |tcp, remote| {
        // A slot for the whole connection, handshake included; none left: closed at once.
        let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
            drop(tcp);
            admission::over_limit(&shared, GRPC, remote);
            return;
        };
        let span = tracing::info_span!("agent", %remote);
        handshakes.spawn(
            handshake(
                tcp,
                remote,
                slot,
                // The configuration current now: a reload applies to new connections.
                TlsAcceptor::from(tls.get()),
                shared.clone(),
                connections.clone(),
                token.clone(),
            )
            .instrument(span),
        );
    })
    .await;
}

async fn handshake(
    tcp: TcpStream,
    remote: SocketAddr,
    slot: tokio::sync::OwnedSemaphorePermit,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    connections: mpsc::Sender<AgentIo>,
    token: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::time::timeout(shared.config.handshake_timeout, acceptor.accept(tcp));
    let failed = |error: HandshakeError| refusal::handshake_failed(&shared, GRPC, remote, &error);
    let tls = tokio::select! {
        result = handshake => match result {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => return failed(error.into()),
            Err(_) => return failed(HandshakeError::Timeout),
        },
        () = token.cancelled() => return,
    };
    let chain = tls.get_ref().1.peer_certificates();
    let registered = match admission::admit(&shared, GRPC, remote, chain) {
        Ok(registered) => Arc::new(registered),
        Err(_) => {
            let mut tls = tls;
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                tokio::io::AsyncWriteExt::shutdown(&mut tls),
            )
            .await;
            return;
        }
    };
    let agent = registered.agent.clone();
    tracing::info!(%agent, %remote, transport = "grpc", "agent connected");
    let io = AgentIo {
        tls,
        _slot: slot,
        peer: Peer {
            agent,
            remote,
            registered,
        },
    };
    // Fails only when the server has stopped: the connection is then dropped (and logged).
    let _ = connections.send(io).await;
}

/// Who is at the other end of a gRPC connection, as the call handler sees it.
#[derive(Debug, Clone)]
struct Peer {
    agent: Arc<str>,
    remote: SocketAddr,
    /// Its place among the connected agents, while any part of the connection lives.
    registered: Arc<Registered>,
}

/// An authenticated agent connection: the TLS stream plus who it is. Dropped when the
/// connection ends, which is logged.
struct AgentIo {
    tls: TlsStream<TcpStream>,
    /// Its `--max-connections` slot, freed when the connection ends.
    _slot: tokio::sync::OwnedSemaphorePermit,
    peer: Peer,
}

impl Drop for AgentIo {
    fn drop(&mut self) {
        tracing::info!(agent = %self.peer.agent, remote = %self.peer.remote, transport = "grpc", "agent disconnected");
    }
}

impl AgentIo {
    /// Once a reload has revoked the agent or taken it off the list, the connection fails its
    /// reads and writes: the call has ended with `permission_denied`, and the agent must not
    /// start another on this connection.
    fn unauthorized(&self) -> Option<std::io::Error> {
        self.peer
            .registered
            .closed_for()
            .map(|kind| std::io::Error::new(std::io::ErrorKind::PermissionDenied, kind.words()))
    }
}

impl Connected for AgentIo {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for AgentIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(refused) = self.unauthorized() {
            return Poll::Ready(Err(refused));
        }
        Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(refused) = self.unauthorized() {
            return Poll::Ready(Err(refused));
        }
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(refused) = self.unauthorized() {
            return Poll::Ready(Err(refused));
        }
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

struct RelayService {
    shared: Arc<Shared>,
    token: CancellationToken,
}

#[tonic::async_trait]
impl Relay for RelayService {
    type StreamStream = ReceiverStream<Result<pb::Ack, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<pb::Batch>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request
            .extensions()
            .get::<Peer>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no authenticated peer"))?;
        let (acks, response) = mpsc::channel(ACK_QUEUE);
        let span = tracing::info_span!("agent", remote = %peer.remote);
        tokio::spawn(
            relay(
                request.into_inner(),
                acks,
                peer,
                self.shared.clone(),
                self.token.clone(),
            )
            .instrument(span),
        );
        let mut response = Response::new(ReceiverStream::new(response));
        // Compressed batches are welcome, also those made against the call's history (the
        // gRPC twins of ALPN `proto::ALPN_ZSTD` and `proto::ALPN_ZSTD_HISTORY`).
        let metadata = response.metadata_mut();
        metadata.insert(
            proto::GRPC_COMPRESSION_HEADER,
            tonic::metadata::MetadataValue::from_static("zstd"),
        );
        metadata.insert(
            proto::GRPC_HISTORY_HEADER,
            tonic::metadata::MetadataValue::from(proto::compression::HISTORY_LEN),
        );
        Ok(response)
    }
}

/// Reads one call's batches, delivers each, acknowledges each once replayed (the batches
/// found replayed together with one: [`ingress::Unacknowledged`]). Ends when the agent
/// finishes its side, the connection fails, a message breaks the protocol, or the sink shuts
/// down; dropping `acks` then ends the response stream.
async fn relay(
    mut batches: Streaming<pb::Batch>,
    mut acks: mpsc::Sender<Result<pb::Ack, Status>>,
    peer: Peer,
    shared: Arc<Shared>,
    token: CancellationToken,
) {
    let mut unacknowledged = ingress::Unacknowledged::default();
    let mut expander = Expander::new(shared.config.max_frame_bytes);
    let refusal = loop {
        let next = tokio::select! {
            // Also once the response stream is closed: the write then fails, and the call ends.
            ack = unacknowledged.ready(), if unacknowledged.is_waiting() => {
                acks.write(ack).await;
                if acks.is_closed() {
                    break None;
                }
                continue;
            }
            next = batches.message(), if unacknowledged.has_room() => next,
            () = token.cancelled() => break None,
            () = peer.registered.closing() => {
                let words = peer.registered.closed_for().map_or("not authorized", |k| k.words());
                break Some(Status::permission_denied(words));
            }
        };
        match next {
            Ok(Some(mut batch)) => {
                if let Err(error) = expander.expand(&mut batch) {
                    break Some(violated(&shared, &peer, error.into()));
                }
                let deliver = ingress::deliver(&shared, &peer.registered, batch);
                unacknowledged.hand_over(deliver, &mut acks).await;
                // The response stream is gone: the agent no longer reads acknowledgements.
                if acks.is_closed() {
                    break None;
                }
            }
            Ok(None) => break None,
            Err(status) => match ProtocolError::of_status(status) {
                Ok(error) => break Some(violated(&shared, &peer, error)),
                Err(status) => {
                    tracing::debug!(agent = %peer.agent, error = %status, "call ended");
                    break None;
                }
            },
        }
    };
    // What was read is acknowledged once replayed; then the call ends (with the refusal,
    // if there was one).
    unacknowledged.drain(&mut acks).await;
    if let Some(status) = refusal {
        let _ = acks.send(Err(status)).await;
    }
}

/// A call's response stream, as [`relay`] writes acknowledgements to it.
impl ingress::AckWriter for mpsc::Sender<Result<pb::Ack, Status>> {
    async fn write(&mut self, ack: pb::Ack) {
        // A failed send means the response stream is closed, which `is_closed` says.
        let _ = self.send(Ok(ack)).await;
    }

    fn is_closed(&self) -> bool {
        // The channel's own (inherent methods come first).
        Self::is_closed(self)
    }
}

/// Counts and logs a protocol violation; returns the status that ends the call (tonic's own,
/// or `invalid_argument` with the error's text).
fn violated(shared: &Shared, peer: &Peer, error: ProtocolError) -> Status {
    refusal::violation(shared, GRPC, &peer.agent, peer.remote, &error);
    match error {
        ProtocolError::Grpc { status, .. } => status,
        other => Status::invalid_argument(other.to_string()),
    }
}

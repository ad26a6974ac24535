//! QUIC ingress: accept agents, check who they are, read their batch frames, acknowledge.
//!
//! The TLS handshake (in rustls, configured by `relay-certs`) has already refused any agent
//! whose certificate does not chain to our CA or lacks the clientAuth usage; this module logs
//! those refusals with the peer address and the reason, and names accepted agents by the name
//! in their certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use proto::compression::Expander;
use proto::pb;
use proto::wire::{FrameReader, WireError, encode_frame};
use quinn::{Connection, Incoming, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::Shared;
use crate::admission;
use crate::ingress::{self, AckWriter as _};
use crate::labels::Transport;
use crate::refusal::{self, HandshakeError, ProtocolError};
use crate::status::Registered;

const QUIC: Transport = Transport::Quic;

/// Application error codes sent in CONNECTION_CLOSE.
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_PROTOCOL: u32 = 1;
/// The agent is not authorized: revoked, not on the allow-list, or over its connection limit.
const CLOSE_UNAUTHORIZED: u32 = 2;

/// Accepts connections until `token` is cancelled or the endpoint closes.
pub(crate) async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = token.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let remote = incoming.remote_address();
        // A slot for the whole connection, handshake included; none left: refused before
        // the handshake costs anything (CONNECTION_REFUSED).
        let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
            incoming.refuse();
            admission::over_limit(&shared, QUIC, remote);
            continue;
        };
        let span = tracing::info_span!("agent", %remote);
        tracker.spawn(handle(incoming, shared.clone(), token.clone(), slot).instrument(span));
    }
}

async fn handle(
    incoming: Incoming,
    shared: Arc<Shared>,
    token: CancellationToken,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let remote = incoming.remote_address();
    let failed = |error: HandshakeError| refusal::handshake_failed(&shared, QUIC, remote, &error);
    let connection = match tokio::time::timeout(shared.config.handshake_timeout, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => return failed(error.into()),
        Err(_) => return failed(HandshakeError::Timeout),
    };
    let chain = connection
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok());
    let registered =
        match admission::admit(&shared, QUIC, remote, chain.as_deref().map(Vec::as_slice)) {
            Ok(registered) => Arc::new(registered),
            Err(kind) => {
                connection.close(
                    VarInt::from_u32(CLOSE_UNAUTHORIZED),
                    kind.words().as_bytes(),
                );
                return;
            }
        };
    let agent = registered.agent.clone();
    tracing::info!(%agent, %remote, transport = "quic", "agent connected");
    let streams = TaskTracker::new();
    let reason = loop {
        let accepted = tokio::select! {
            accepted = connection.accept_bi() => accepted,
            () = token.cancelled() => break Ended::Shutdown,
            () = registered.closing() => {
                // Closed now, not after the streams: the agent is no longer trusted, and what
                // it has in flight is not replayed.
                let words = registered.closed_for().map_or("not authorized", |k| k.words());
                connection.close(VarInt::from_u32(CLOSE_UNAUTHORIZED), words.as_bytes());
                break Ended::Unauthorized(words);
            }
        };
        match accepted {
            Ok((send, recv)) => {
                streams.spawn(stream(
                    send,
                    recv,
                    connection.clone(),
                    registered.clone(),
                    remote,
                    shared.clone(),
                    token.clone(),
                ));
            }
            Err(error) => break Ended::Connection(error),
        }
    };
    // On shutdown the streams stop reading, and acknowledge what they read once it is
    // replayed: only then is the connection closed, so the agent resends nothing the sink
    // has already replayed.
    streams.close();
    streams.wait().await;
    connection.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"sink shutting down");
    tracing::info!(%agent, %remote, transport = "quic", %reason, "agent disconnected");
}

/// Why an agent's connection ended, for the log.
#[derive(Debug, thiserror::Error)]
enum Ended {
    /// The sink is shutting down.
    #[error("sink shutting down")]
    Shutdown,
    /// A reload no longer authorizes the agent; the words it was told.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The connection closed or failed.
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
}

/// Reads an agent's batches off one stream, hands them to replay, and acknowledges each once
/// it has been replayed ([`ingress::Unacknowledged`]).
async fn stream(
    send: SendStream,
    recv: RecvStream,
    connection: Connection,
    registered: Arc<Registered>,
    remote: SocketAddr,
    shared: Arc<Shared>,
    token: CancellationToken,
) {
    let agent = registered.agent.clone();
    let mut reader = FrameReader::new(recv, shared.config.max_frame_bytes);
    let mut acks = Acks::new(send, agent.clone());
    let mut unacknowledged = ingress::Unacknowledged::default();
    let mut expander = Expander::new(shared.config.max_frame_bytes);
    // Set when a frame was already incomplete at the previous `--frame-timeout` tick: a
    // frame gets at least one whole period (at most two) to arrive once it has begun, and
    // the time between frames is not limited (an idle agent sends none). One ticking timer
    // per stream, not one per frame: with thousands of agents sending a datagram at a time,
    // arming and disarming a timer per batch is a cost of its own.
    let period = shared.config.frame_timeout;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled = false;
    loop {
        let next = tokio::select! {
            ack = unacknowledged.ready(), if unacknowledged.can_acknowledge(&acks) => {
                acks.write(ack).await;
                if acks.closed {
                    break;
                }
                continue;
            }
            next = reader.next::<pb::Batch>(), if unacknowledged.has_room() => next,
            _ = tick.tick() => {
                // Not reading (too many batches wait for their replay) is not the agent's
                // stall.
                if reader.buffered() == 0 || !unacknowledged.has_room() {
                    stalled = false;
                    continue;
                }
                if !stalled {
                    stalled = true;
                    continue;
                }
                let error = ProtocolError::FrameTimeout {
                    buffered: reader.buffered(),
                };
                break violated(&shared, &connection, &agent, remote, &error);
            }
            () = token.cancelled() => break,
        };
        stalled = false;
        let mut batch = match next {
            Ok(Some(batch)) => batch,
            Ok(None) => break,
            Err(WireError::Io(error)) => {
                tracing::debug!(%agent, %error, "stream ended");
                break;
            }
            Err(error) => break violated(&shared, &connection, &agent, remote, &error.into()),
        };
        if let Err(error) = expander.expand(&mut batch) {
            break violated(&shared, &connection, &agent, remote, &error.into());
        }
        let deliver = ingress::deliver(&shared, &registered, batch);
        unacknowledged.hand_over(deliver, &mut acks).await;
        if acks.closed {
            break;
        }
    }
    // What was read is acknowledged once replayed; then the stream is finished.
    unacknowledged.drain(&mut acks).await;
    acks.finish().await;
}

/// Where one stream's acknowledgements are written.
struct Acks {
    send: SendStream,
    frame: BytesMut,
    agent: Arc<str>,
    /// A write failed or timed out: the agent no longer reads them.
    closed: bool,
}

impl Acks {
    fn new(send: SendStream, agent: Arc<str>) -> Self {
        Self {
            send,
            frame: BytesMut::with_capacity(32),
            agent,
            closed: false,
        }
    }

    /// Once the last acknowledgement is written, finishes the stream.
    async fn finish(mut self) {
        if self.closed {
            return;
        }
        // Closing the connection discards stream data not yet delivered: wait (briefly)
        // until the agent has the last acknowledgements, or it would send those batches
        // again.
        if self.send.finish().is_ok() {
            let _ = tokio::time::timeout(ACKS_DELIVERY, self.send.stopped()).await;
        }
    }
}

impl ingress::AckWriter for Acks {
    /// Writes `ack`; when that fails, the stream is given up (`closed`).
    async fn write(&mut self, ack: pb::Ack) {
        self.frame.clear();
        encode_frame(&ack, &mut self.frame);
        // `timeout` polls the write first and registers its timer only if the write has to
        // wait (the stream's window is full): the usual acknowledgement arms none.
        let write = tokio::time::timeout(ACK_WRITE_LIMIT, self.send.write_all(&self.frame));
        if !matches!(write.await, Ok(Ok(()))) {
            tracing::debug!(agent = %self.agent, "could not acknowledge; stream closed");
            self.closed = true;
        }
    }

    fn is_closed(&self) -> bool {
        self.closed
    }
}

/// Counts and logs a protocol violation, and closes the agent's connection with its text.
fn violated(
    shared: &Shared,
    connection: &Connection,
    agent: &str,
    remote: SocketAddr,
    error: &ProtocolError,
) {
    refusal::violation(shared, QUIC, agent, remote, error);
    connection.close(
        VarInt::from_u32(CLOSE_PROTOCOL),
        error.to_string().as_bytes(),
    );
}

/// How long an acknowledgement may wait for room in the stream before the stream is given up.
const ACK_WRITE_LIMIT: Duration = Duration::from_secs(30);

/// How long a finished stream waits for the agent to receive its last acknowledgements.
const ACKS_DELIVERY: Duration = Duration::from_secs(2);

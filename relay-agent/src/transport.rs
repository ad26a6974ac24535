//! Carrying frames to sinks. One link per sink, each with its own queue, connection and
//! reconnect schedule, so a dead sink holds back no other.
//!
//! A link holds one [`Session`] at a time, over QUIC ([`quic`]) or gRPC ([`grpc`]); both carry
//! the same frames and bring back the same acknowledgements (each is a [`Wire`], opened by a
//! [`Dial`]), so everything above the session (the window, acknowledgements, resending,
//! backoff, shutdown) is written once, here. Why a connection failed or a session ended is a
//! [`TransportError`] ([`error`]).
//!
//! **Delivery.** The link reads batches from the sink's [`Backlog`] in order and keeps up to
//! `window_bytes` of them unacknowledged on the wire. The sink acknowledges a batch once it
//! has replayed it; the link then releases it from the backlog (and the spool). When a
//! connection breaks, whatever was not acknowledged is sent again, oldest first, on the next
//! one; the sink recognises what it had already replayed (by agent, session and sequence) and
//! does not replay it twice.
//!
//! **Transports.** With [`TransportMode::Auto`] a link tries QUIC first and, when no QUIC
//! handshake completes within `quic_fallback_after`, carries on over gRPC. While on gRPC it
//! tries QUIC again every `quic_retry_interval`; when that works it stops sending on gRPC,
//! waits (briefly) for the sink to acknowledge what it sent there, then goes on over QUIC from
//! the oldest unacknowledged batch.

pub(crate) mod error;
pub(crate) mod grpc;
pub(crate) mod quic;

#[cfg(test)]
mod failure_tests;
#[cfg(test)]
mod link_tests;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proto::compression::{Accepts, Compressor};
use runtime::reload::Swap;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::CertificateDer;

use crate::backlog::{Backlog, Record};
use crate::config::{SinkConfig, TransportMode};
use crate::metrics::{InUse, SinkMetrics};
pub(crate) use error::TransportError;
use error::{FailureKind, Transport};

/// A connection that lasts this long counts as accepted, even with nothing to send.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Moving from gRPC back to QUIC waits at most this long for the sink to acknowledge what was
/// sent over gRPC.
const SWITCH_DRAIN: Duration = Duration::from_secs(10);

/// Shutting down with everything unacknowledged safe in the spool, a link goes on only while
/// it makes progress: after this long with neither a batch sent nor one acknowledged it
/// stops, and the rest waits in the spool for the next start.
const SPOOLED_PATIENCE: Duration = Duration::from_secs(1);

/// Acks are tiny; anything larger is a broken peer.
const MAX_ACK_LEN: usize = 1024;

/// A batch sent more than this long after it was made is catch-up traffic: it waited out an
/// outage, or behind earlier catch-up batches. Live batches leave within milliseconds.
const CATCH_UP_AGE: Duration = Duration::from_secs(1);

/// While more than this many catch-up datagrams are unacknowledged (or 20 ms of the live
/// rate, if more), what is sent next is catch-up too: it will reach the sink's replay behind
/// them, and unpaced it would leave in a burst as soon as they are done.
const CATCH_UP_TAIL: u64 = 64;

/// A future a connector or session returns: boxed, so that both transports (and the tests'
/// in-memory sessions) sit behind one trait object. One allocation per batch sent, next to a
/// batch of tens of kilobytes.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens sessions to one sink over one transport.
pub(crate) trait Dial: Send + Sync {
    /// One attempt, given up after `timeout`.
    fn connect(&self, timeout: Duration) -> BoxFuture<'_, Result<Session, TransportError>>;
}

/// One open connection to a sink, as the link uses it: frames out, acknowledgements in.
pub(crate) trait Wire: Send + Sync {
    /// The sink's address.
    fn remote(&self) -> SocketAddr;

    /// The certificate chain the sink presented.
    fn peer_chain(&self) -> Option<Vec<CertificateDer<'static>>>;

    /// What compression the sink takes.
    fn accepts(&self) -> Accepts;

    /// The latest acknowledgement on this session.
    fn acked(&self) -> watch::Receiver<Acked>;

    /// Writes one frame (length prefix and body).
    fn send(&mut self, frame: Bytes) -> BoxFuture<'_, Result<(), TransportError>>;

    /// Resolves, with the reason, when the session has failed or the sink has ended it.
    fn broken(&self) -> BoxFuture<'_, TransportError>;

    /// No more frames: tell the sink, which acknowledges what it has and ends its side.
    fn finish(&mut self);

    /// Ends the connection now, telling the sink `reason` where the transport can.
    fn close(self: Box<Self>, reason: &str);
}

/// One connection to a sink, over either transport.
pub(crate) struct Session {
    transport: Transport,
    wire: Box<dyn Wire>,
}

impl Session {
    pub(crate) fn new(transport: Transport, wire: Box<dyn Wire>) -> Self {
        Self { transport, wire }
    }

    fn in_use(&self) -> InUse {
        match self.transport {
            Transport::Quic => InUse::Quic,
            Transport::Grpc => InUse::Grpc,
        }
    }

    /// When the certificate the sink presented expires, RFC 3339.
    fn sink_certificate_expires(&self) -> String {
        self.wire
            .peer_chain()
            .as_deref()
            .and_then(|chain| chain.first())
            .and_then(|leaf| certs::CertInfo::from_der(leaf).ok())
            .map_or_else(
                || "-".into(),
                |info| certs::inspect::rfc3339(info.not_after),
            )
    }

    fn close(self, reason: &str) {
        self.wire.close(reason);
    }
}

/// The latest acknowledgement of a session: (agent session, batch sequence). Acknowledgements
/// are cumulative: the sink acknowledges batches in the order it received them.
pub(crate) type Acked = Option<(u64, u64)>;

/// The link's compressor at zstd `level`; `None` (batches go plain) without a level, or
/// should zstd refuse it (the level was checked at start-up).
pub(crate) fn compressor(level: Option<i32>) -> Option<Compressor> {
    level.and_then(|level| {
        Compressor::new(level)
            .inspect_err(
                |error| tracing::error!(%error, "zstd unavailable: batches go uncompressed"),
            )
            .ok()
    })
}

/// The frame to send a sink: compressed by `compressor` as far as the sink takes it (against
/// the connection's history, or on its own), else as it is; a frame compressed earlier (by an
/// earlier run, and spooled) goes as it is to a sink that takes compression and expanded to one
/// that does not. With `catch_up` (the agent's live rate), marked as catch-up.
fn frame_for(
    record: &Record,
    session: &Session,
    compressor: Option<&mut Compressor>,
    catch_up: Option<u32>,
    sink: &SinkConfig,
) -> Result<Bytes, TransportError> {
    let accepts = session.wire.accepts();
    let mut bytes = match (accepts, compressor) {
        (Accepts::Plain, _) => {
            proto::compression::plain_frame(&record.bytes, proto::wire::DEFAULT_MAX_FRAME_LEN)
                .map_err(|e| {
                    TransportError::new(
                        FailureKind::Other,
                        session.transport,
                        sink,
                        format_args!(
                            "batch {} cannot be sent uncompressed: {e}",
                            record.sequence
                        ),
                    )
                    .with_source(e)
                })?
        }
        (_, None) => record.bytes.clone(),
        (Accepts::Zstd | Accepts::ZstdHistory, Some(compressor)) => compressor
            .compress_frame(&record.bytes, accepts == Accepts::ZstdHistory)
            .unwrap_or_else(|error| {
                tracing::warn!(sink = %sink.addr, %error, "batch compression failed: sent uncompressed");
                record.bytes.clone()
            }),
    };
    if let Some(live) = catch_up {
        bytes = proto::wire::mark_catch_up(&bytes, live);
    }
    Ok(bytes)
}

/// Records an acknowledgement from the sink (both transports' ack readers call this).
fn acknowledged(acked: &watch::Sender<Acked>, ack: &proto::pb::Ack) {
    acked.send_replace(Some((ack.session, ack.sequence)));
}

/// A batch on the wire, not yet acknowledged.
#[derive(Debug)]
struct InFlight {
    id: u64,
    session: u64,
    sequence: u64,
    datagrams: u64,
    len: usize,
    catch_up: bool,
}

/// What an acknowledgement settled: everything up to backlog id `through`.
#[derive(Debug, Clone, Copy)]
struct Settled {
    through: u64,
    batches: u64,
    datagrams: u64,
}

/// The batches on the wire of one session, oldest first, and their bytes.
#[derive(Debug, Default)]
struct Window {
    batches: VecDeque<InFlight>,
    bytes: usize,
    /// Datagrams of the batches sent as catch-up.
    catch_up: u64,
}

impl Window {
    fn push(&mut self, record: &Record, catch_up: bool) {
        self.bytes += record.bytes.len();
        if catch_up {
            self.catch_up += record.datagrams;
        }
        self.batches.push_back(InFlight {
            id: record.id,
            session: record.session,
            sequence: record.sequence,
            datagrams: record.datagrams,
            len: record.bytes.len(),
            catch_up,
        });
    }

    fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Takes what `ack` acknowledges off the front, if anything.
    fn settle(&mut self, ack: Acked) -> Option<Settled> {
        let (session, sequence) = ack?;
        let last = self
            .batches
            .iter()
            .position(|f| f.session == session && f.sequence == sequence)?;
        let mut settled = Settled {
            through: 0,
            batches: 0,
            datagrams: 0,
        };
        for f in self.batches.drain(..=last) {
            self.bytes -= f.len;
            if f.catch_up {
                self.catch_up -= f.datagrams;
            }
            settled.through = f.id;
            settled.batches += 1;
            settled.datagrams += f.datagrams;
        }
        Some(settled)
    }
}

/// How a session ended.
enum Ended {
    /// The queue closed (the agent is shutting down) and the end was handled.
    Shutdown,
    /// The connection broke or the sink ended it.
    Broken(TransportError),
    /// `auto` found QUIC again; the gRPC session is finished (and drained).
    Switch(Box<Session>),
}

/// The TLS configurations a link connects with, for QUIC and gRPC; replaced whole when the
/// certificate files are reloaded, and used from the next connection on.
#[derive(Debug)]
pub(crate) struct Credentials {
    pub(crate) quic: Swap<quinn::ClientConfig>,
    pub(crate) grpc: Swap<tokio_rustls::rustls::ClientConfig>,
}

/// Why a set of certificate files makes no TLS configuration.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CredentialsError {
    /// The files do not make a rustls client configuration.
    #[error(transparent)]
    Tls(#[from] certs::Error),
    /// The rustls configuration is unfit for QUIC.
    #[error(transparent)]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

impl Credentials {
    /// Both configurations from a checked set of files.
    pub(crate) fn new(
        loaded: &certs::Loaded,
        transport: &Arc<quinn::TransportConfig>,
    ) -> Result<Self, CredentialsError> {
        let (quic, grpc) = Self::build(loaded, transport)?;
        Ok(Self {
            quic: Swap::new(quic),
            grpc: Swap::new(grpc),
        })
    }

    /// Replaces both with those of a newly loaded set.
    pub(crate) fn replace(
        &self,
        loaded: &certs::Loaded,
        transport: &Arc<quinn::TransportConfig>,
    ) -> Result<(), CredentialsError> {
        let (quic, grpc) = Self::build(loaded, transport)?;
        self.quic.set(quic);
        self.grpc.set(grpc);
        Ok(())
    }

    fn build(
        loaded: &certs::Loaded,
        transport: &Arc<quinn::TransportConfig>,
    ) -> Result<(quinn::ClientConfig, tokio_rustls::rustls::ClientConfig), CredentialsError> {
        // ALPN_ZSTD is offered always: a sink that picks it accepts compressed batches (and
        // plain ones).
        let tls = certs::client_config(&loaded.ca, &loaded.identity, proto::RELAY_ALPNS)?;
        let grpc = certs::client_config(&loaded.ca, &loaded.identity, &[proto::GRPC_ALPN])?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
        quic.transport_config(transport.clone());
        Ok((quic, grpc))
    }
}

/// Opens sessions to one sink, by its transport mode.
pub(crate) struct Dialer {
    pub(crate) sink: SinkConfig,
    pub(crate) quic: Arc<dyn Dial>,
    pub(crate) grpc: Arc<dyn Dial>,
    pub(crate) metrics: Arc<SinkMetrics>,
    pub(crate) connect_timeout: Duration,
    pub(crate) quic_fallback_after: Duration,
    pub(crate) quic_retry_interval: Duration,
}

impl Dialer {
    /// One connection attempt.
    async fn connect(&self) -> Result<Session, TransportError> {
        match self.sink.transport {
            TransportMode::Quic => self.quic.connect(self.connect_timeout).await,
            TransportMode::Grpc => self.grpc.connect(self.connect_timeout).await,
            TransportMode::Auto => {
                let quic_reason = match self.quic.connect(self.quic_fallback_after).await {
                    Ok(session) => return Ok(session),
                    Err(reason) => reason,
                };
                match self.grpc.connect(self.connect_timeout).await {
                    Ok(session) => {
                        self.metrics.fallbacks_to_grpc.inc();
                        tracing::warn!(
                            sink = %self.sink.addr,
                            reason = %quic_reason,
                            quic_retry_interval = ?self.quic_retry_interval,
                            "transport changed: QUIC unavailable, carrying on over gRPC"
                        );
                        Ok(session)
                    }
                    Err(grpc_reason) => Err(grpc_reason.after_quic(quic_reason)),
                }
            }
        }
    }
}

/// Everything a link needs.
pub(crate) struct Link {
    /// The sink, its metrics and how to reach it.
    pub(crate) dialer: Dialer,
    pub(crate) backlog: Arc<Backlog>,
    pub(crate) backoff: Backoff,
    /// Most bytes unacknowledged on the wire.
    pub(crate) window_bytes: usize,
    /// Highest backlog id acknowledged (released).
    pub(crate) released: u64,
    /// Highest backlog id ever sent (what is sent again at or below it is a resend).
    pub(crate) sent_through: u64,
    /// Datagrams a second coming into the backlog.
    pub(crate) live_rate: LiveRate,
    /// Compresses what is sent (`None`: `--compression none`); its history is the current
    /// connection's.
    pub(crate) compressor: Option<Compressor>,
    /// Bytes of the frames as first sent, after compression (the agent's
    /// `relay_agent_frame_bytes_total`).
    pub(crate) frame_bytes: prometheus::IntCounter,
}

/// The rate at which datagrams come into a sink's backlog (the site's live rate), measured
/// over windows of at least [`LiveRate::WINDOW`].
#[derive(Debug, Default)]
pub(crate) struct LiveRate {
    /// Start of the current window: (when, datagrams appended by then).
    since: Option<(Instant, u64)>,
    per_second: u32,
}

impl LiveRate {
    const WINDOW: Duration = Duration::from_secs(1);

    /// The rate, given the backlog's count of datagrams appended so far.
    pub(crate) fn update(&mut self, now: Instant, appended: u64) -> u32 {
        match self.since {
            None => self.since = Some((now, appended)),
            Some((at, count)) => {
                let elapsed = now.duration_since(at);
                if elapsed >= Self::WINDOW {
                    let rate = appended.saturating_sub(count) as f64 / elapsed.as_secs_f64();
                    self.per_second = rate.min(f64::from(u32::MAX)) as u32;
                    self.since = Some((now, appended));
                }
            }
        }
        self.per_second
    }
}

/// Whether a session has proven itself: the sink acknowledged something, or the connection
/// stayed up [`HEALTHY_AFTER`]. In TLS 1.3 the sink checks our certificate after our side of
/// the handshake is done, so "connected" is not yet "accepted": the backoff resets only once
/// a session is proven, and a refused agent keeps backing off instead of hammering the sink.
#[derive(Debug)]
struct Proof {
    proven: bool,
    healthy_after: Instant,
}

impl Proof {
    fn new() -> Self {
        Self {
            proven: false,
            healthy_after: Instant::now() + HEALTHY_AFTER,
        }
    }

    /// Whether the session is proven as of now (with `acknowledged`, by an acknowledgement);
    /// true only the first time, when the backoff is to be reset.
    fn newly_proven(&mut self, acknowledged: bool) -> bool {
        if self.proven || !(acknowledged || Instant::now() >= self.healthy_after) {
            return false;
        }
        self.proven = true;
        true
    }
}

impl Link {
    /// Runs until the backlog is closed and everything in it is acknowledged, or (when the
    /// sink cannot be reached) on disk for the next run.
    pub(crate) async fn run(mut self) {
        while let Some(session) = self.connect().await {
            if !self.carry(session).await {
                return;
            }
        }
    }

    /// Connects, backing off after each failed attempt. `None` when the agent is shutting
    /// down and nothing is left that only memory holds.
    async fn connect(&mut self) -> Option<Session> {
        let backlog = self.backlog.clone();
        loop {
            // While connecting, also watch for the end: an agent shutting down whose batches
            // for this sink are all acknowledged or spooled need not wait for a handshake
            // that may never complete.
            let attempt = tokio::select! {
                result = self.dialer.connect() => result,
                () = backlog.settled() => {
                    self.stopping("shutting down: nothing left to send to this sink");
                    return None;
                }
            };
            match attempt {
                Ok(session) => return Some(session),
                Err(reason) => {
                    self.dialer.metrics.connect_failed(reason.kind().label());
                    let wait = self.backoff.next_delay();
                    tracing::warn!(sink = %reason.sink(), transport = reason.transport(), %reason, retry_in = ?wait, "cannot connect to sink");
                    if !self.pause(wait).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Streams over `session`, and over the QUIC session that replaces it when `auto` finds
    /// QUIC again, until the connection is lost (true: connect again, the wait done) or the
    /// link is done (false).
    async fn carry(&mut self, mut session: Session) -> bool {
        loop {
            self.connected(&session);
            self.backlog.set_sending(true);
            let mut window = Window::default();
            let ended = self.stream(&mut session, &mut window).await;
            self.backlog.set_sending(false);
            self.dialer.metrics.set_transport(InUse::None);
            // Only these can reach the sink twice; the rest of the backlog was never sent.
            let unacknowledged = window.batches.len();
            let (backlog_batches, _, _) = self.backlog.pending();
            match ended {
                Ended::Shutdown => {
                    session.close("agent shutting down");
                    return false;
                }
                Ended::Switch(next) => {
                    self.dialer.metrics.returns_to_quic.inc();
                    tracing::info!(
                        sink = %self.dialer.sink.addr,
                        unacknowledged_batches = unacknowledged,
                        backlog_batches,
                        reason = "a QUIC handshake completed again",
                        "transport changed: gRPC to QUIC"
                    );
                    std::mem::replace(&mut session, *next).close("moving to QUIC");
                }
                Ended::Broken(reason) => {
                    let wait = self.backoff.next_delay();
                    tracing::warn!(
                        sink = %self.dialer.sink.addr,
                        transport = session.transport.as_str(),
                        %reason,
                        unacknowledged_batches = unacknowledged,
                        backlog_batches,
                        retry_in = ?wait,
                        "connection to sink lost; reconnecting (unacknowledged batches will be sent again)"
                    );
                    session.close("connection lost");
                    return self.pause(wait).await;
                }
            }
        }
    }

    /// Counts and logs a new session.
    fn connected(&self, session: &Session) {
        let metrics = &self.dialer.metrics;
        if metrics.connects.get() > 0 {
            metrics.reconnects.inc();
        }
        metrics.connects.inc();
        metrics.set_transport(session.in_use());
        tracing::info!(
            sink = %self.dialer.sink.addr,
            remote = %session.wire.remote(),
            transport = session.transport.as_str(),
            sink_certificate_expires = %session.sink_certificate_expires(),
            sink_accepts_compression = session.wire.accepts() != Accepts::Plain,
            compression = session.wire.accepts().as_str(),
            "connected to sink"
        );
    }

    /// The sink has acknowledged `settled`.
    fn release(&mut self, settled: Settled) {
        self.released = self.released.max(settled.through);
        self.backlog.release_through(settled.through);
        let metrics = &self.dialer.metrics;
        metrics.batches_acknowledged.inc_by(settled.batches);
        metrics.datagrams_acknowledged.inc_by(settled.datagrams);
    }

    /// Releases what the latest acknowledgement settles, if anything; whether it did.
    fn take_ack(&mut self, in_flight: &mut Window, acked: &mut watch::Receiver<Acked>) -> bool {
        let Some(settled) = in_flight.settle(*acked.borrow_and_update()) else {
            return false;
        };
        self.release(settled);
        true
    }

    fn stopping(&self, why: &str) {
        let (batches, datagrams, memory_only) = self.backlog.pending();
        tracing::info!(
            sink = %self.dialer.sink.addr,
            spooled_batches = batches,
            spooled_datagrams = datagrams - memory_only,
            "{why}"
        );
    }

    /// Waits `wait` before the next attempt. Returns false when the agent is shutting down
    /// and nothing is left that only memory holds: no reason to retry.
    async fn pause(&mut self, wait: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(wait) => true,
            () = self.backlog.settled() => {
                self.stopping("sink unreachable and nothing left to send that is not in the spool");
                false
            }
        }
    }

    /// Streams batches on one session until the backlog is closed and all acknowledged, the
    /// session breaks, or (`auto` on gRPC) QUIC works again.
    /// `in_flight` ends holding what was sent on this session and never acknowledged.
    async fn stream(&mut self, session: &mut Session, in_flight: &mut Window) -> Ended {
        let backlog = self.backlog.clone();
        let mut acked = session.wire.acked();
        // Everything not acknowledged goes (again), oldest first.
        let mut cursor = self.released;
        let mut finishing = false;
        let mut proof = Proof::new();
        let mut last_progress = Instant::now();
        // A new connection: the sink has no history of it.
        if let Some(compressor) = &mut self.compressor {
            compressor.reset();
        }
        let probing = self.dialer.sink.transport == TransportMode::Auto
            && session.transport == Transport::Grpc;
        let probe = probe_quic(
            self.dialer.quic.clone(),
            probing,
            self.dialer.quic_retry_interval,
            self.dialer.quic_fallback_after,
        );
        tokio::pin!(probe);
        loop {
            if proof.newly_proven(false) {
                self.backoff.reset();
            }
            if finishing && in_flight.is_empty() {
                tracing::info!(sink = %self.dialer.sink.addr, "all batches acknowledged");
                return Ended::Shutdown;
            }
            tokio::select! {
                biased;
                changed = acked.changed() => {
                    if changed.is_err() {
                        // The ack reader has ended: the session is over, `broken` says why.
                        return Ended::Broken(session.wire.broken().await);
                    }
                    if self.take_ack(in_flight, &mut acked) {
                        last_progress = Instant::now();
                        if proof.newly_proven(true) {
                            self.backoff.reset();
                        }
                    }
                }
                reason = session.wire.broken() => return Ended::Broken(reason),
                () = tokio::time::sleep_until(proof.healthy_after), if !proof.proven => {}
                () = tokio::time::sleep_until(last_progress + SPOOLED_PATIENCE), if backlog.is_settled() => {
                    if Instant::now() >= last_progress + SPOOLED_PATIENCE && backlog.is_settled() {
                        self.stopping("shutting down: the sink is not acknowledging; the rest stays in the spool");
                        return Ended::Shutdown;
                    }
                }
                next = &mut probe => {
                    self.drain_before_switch(session, in_flight, &mut acked).await;
                    return Ended::Switch(Box::new(next));
                }
                record = backlog.next_after(cursor), if !finishing && in_flight.bytes < self.window_bytes => {
                    let Some(record) = record else {
                        // Closed and all sent: finish the stream, wait for the last acks.
                        finishing = true;
                        session.wire.finish();
                        continue;
                    };
                    if let Err(reason) = self.send(session, in_flight, &record).await {
                        return Ended::Broken(reason);
                    }
                    cursor = record.id;
                    last_progress = Instant::now();
                }
            }
        }
    }

    /// Sends `record` on `session` (as catch-up traffic when it is) and counts it.
    async fn send(
        &mut self,
        session: &mut Session,
        in_flight: &mut Window,
        record: &Record,
    ) -> Result<(), TransportError> {
        let resend = record.id <= self.sent_through;
        let live = self
            .live_rate
            .update(Instant::now(), self.backlog.appended_datagrams());
        let catch_up = is_catch_up(record, resend, in_flight.catch_up, live).then_some(live);
        let frame = frame_for(
            record,
            session,
            self.compressor.as_mut(),
            catch_up,
            &self.dialer.sink,
        )?;
        let len = frame.len() as u64;
        session.wire.send(frame).await?;
        let metrics = &self.dialer.metrics;
        if resend {
            metrics.batches_resent.inc();
        } else {
            self.frame_bytes.inc_by(len);
        }
        if catch_up.is_some() {
            metrics.catch_up_datagrams_sent.inc_by(record.datagrams);
        }
        self.sent_through = self.sent_through.max(record.id);
        in_flight.push(record, catch_up.is_some());
        metrics.batches_sent.inc();
        metrics.datagrams_sent.inc_by(record.datagrams);
        metrics.bytes_sent.inc_by(len);
        Ok(())
    }

    /// QUIC works again: nothing more goes on the gRPC `session`, and what went is, with
    /// luck, acknowledged before QUIC takes over (what is not will be sent again, and
    /// recognised). Waits at most [`SWITCH_DRAIN`].
    async fn drain_before_switch(
        &mut self,
        session: &mut Session,
        in_flight: &mut Window,
        acked: &mut watch::Receiver<Acked>,
    ) {
        session.wire.finish();
        let drained = tokio::time::timeout(SWITCH_DRAIN, async {
            while !in_flight.is_empty() {
                tokio::select! {
                    changed = acked.changed() => {
                        if changed.is_err() { return; }
                        self.take_ack(in_flight, acked);
                    }
                    _ = session.wire.broken() => return,
                }
            }
        })
        .await;
        // The call ends when the sink has acknowledged what it got and finished its side:
        // that last acknowledgement may not have been taken above.
        self.take_ack(in_flight, acked);
        if drained.is_err() || !in_flight.is_empty() {
            tracing::warn!(sink = %self.dialer.sink.addr, "moving to QUIC before the sink acknowledged everything sent over gRPC; the rest is sent again");
        }
    }
}

/// Whether `record` goes as catch-up traffic, which the sink paces: sent again, read back
/// from the spool, made a while ago (it waited out an outage or a full window), or following
/// more than a small tail of catch-up datagrams (`unacknowledged_catch_up`) that the sink has
/// not yet acknowledged. `live` is the live rate, datagrams a second.
fn is_catch_up(record: &Record, resend: bool, unacknowledged_catch_up: u64, live: u32) -> bool {
    let age_ms = crate::backlog::now_ms().saturating_sub(record.unix_ms);
    resend
        || record.from_disk
        || age_ms > CATCH_UP_AGE.as_millis() as u64
        || unacknowledged_catch_up > CATCH_UP_TAIL.max(u64::from(live) / 50)
}

/// With `enabled`, tries a QUIC handshake every `interval` and returns the first session that
/// opens; otherwise never returns.
async fn probe_quic(
    quic: Arc<dyn Dial>,
    enabled: bool,
    interval: Duration,
    timeout: Duration,
) -> Session {
    if !enabled {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(interval).await;
        match quic.connect(timeout).await {
            Ok(session) => return session,
            Err(reason) => {
                tracing::debug!(sink = %reason.sink(), %reason, "QUIC still unavailable")
            }
        }
    }
}

/// Resolves the sink's `HOST:PORT` to its first address.
async fn resolve(sink: &SinkConfig, transport: Transport) -> Result<SocketAddr, TransportError> {
    let addr = &sink.addr;
    let mut addrs = tokio::net::lookup_host(addr).await.map_err(|e| {
        TransportError::new(
            FailureKind::Other,
            transport,
            sink,
            format_args!("cannot resolve {addr}: {e}"),
        )
        .with_source(e)
    })?;
    addrs.next().ok_or_else(|| {
        TransportError::new(
            FailureKind::Other,
            transport,
            sink,
            format_args!("{addr} resolves to no address"),
        )
    })
}

/// Exponential backoff with jitter: each wait is drawn between half and all of a ceiling that
/// doubles per failure, from `min` up to `max`. Jitter keeps a fleet of agents that lost the
/// same sink from reconnecting in lockstep.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The next wait.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        ceiling.mul_f64(rand::random_range(0.5..=1.0))
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catch_up_is_what_was_sent_before_kept_on_disk_old_or_behind_catch_up() {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let fresh = Record {
            id: 1,
            session: 1,
            sequence: 1,
            datagrams: 10,
            bytes: Bytes::new(),
            unix_ms: now_ms,
            from_disk: false,
        };
        assert!(!is_catch_up(&fresh, false, 0, 2_000), "live");
        assert!(is_catch_up(&fresh, true, 0, 2_000), "sent again");
        let spooled = Record {
            from_disk: true,
            ..fresh.clone()
        };
        assert!(
            is_catch_up(&spooled, false, 0, 2_000),
            "read back from disk"
        );
        let old = Record {
            unix_ms: now_ms - 5_000,
            ..fresh.clone()
        };
        assert!(is_catch_up(&old, false, 0, 2_000), "waited out an outage");
        assert!(!is_catch_up(&fresh, false, 64, 2_000), "a short tail");
        assert!(is_catch_up(&fresh, false, 65, 2_000), "behind catch-up");
        assert!(
            !is_catch_up(&fresh, false, 180, 9_000),
            "the tail grows with the live rate (20 ms of it)"
        );
    }

    #[test]
    fn the_live_rate_is_measured_over_a_second_or_more() {
        let start = Instant::now();
        let mut rate = LiveRate::default();
        assert_eq!(rate.update(start, 0), 0);
        assert_eq!(rate.update(start + Duration::from_millis(500), 700), 0);
        assert_eq!(rate.update(start + Duration::from_secs(1), 1_000), 1_000);
        // A long silence (an outage) is one window: the datagrams that came in over it.
        assert_eq!(rate.update(start + Duration::from_secs(31), 61_000), 2_000);
    }

    #[test]
    fn backoff_doubles_up_to_the_ceiling_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let ceiling = Duration::from_millis(100 * (1 << i)).min(Duration::from_secs(1));
            assert!(*d >= ceiling / 2 && *d <= ceiling, "attempt {i}: {d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}

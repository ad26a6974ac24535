//! Carrying frames to sinks. One link per sink, each with its own queue, connection and
//! reconnect schedule, so a dead sink holds back no other.
//!
//! A link holds one [`Session`] at a time, over QUIC ([`quic`]) or gRPC ([`grpc`]); both carry
//! the same frames and bring back the same acknowledgements, so everything above the session
//! (the window, acknowledgements, resending, backoff, shutdown) is written once, here.
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

pub(crate) mod grpc;
pub(crate) mod quic;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use runtime::reload::Swap;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::backlog::{Backlog, Record};
use crate::config::{SinkConfig, TransportMode};
use crate::metrics::{ConnectFailure, InUse, SinkMetrics};

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

/// One connection to a sink, over either transport.
pub(crate) enum Session {
    Quic(quic::Session),
    Grpc(grpc::Session),
}

impl Session {
    fn transport(&self) -> &'static str {
        match self {
            Self::Quic(_) => "quic",
            Self::Grpc(_) => "grpc",
        }
    }

    fn in_use(&self) -> InUse {
        match self {
            Self::Quic(_) => InUse::Quic,
            Self::Grpc(_) => InUse::Grpc,
        }
    }

    fn remote(&self) -> SocketAddr {
        match self {
            Self::Quic(s) => s.remote(),
            Self::Grpc(s) => s.remote(),
        }
    }

    /// When the certificate the sink presented expires, RFC 3339.
    fn sink_certificate_expires(&self) -> String {
        let chain = match self {
            Self::Quic(s) => s.peer_chain(),
            Self::Grpc(s) => s.peer_chain(),
        };
        chain
            .as_deref()
            .and_then(|chain| chain.first())
            .and_then(|leaf| certs::CertInfo::from_der(leaf).ok())
            .map_or_else(
                || "-".into(),
                |info| certs::inspect::rfc3339(info.not_after),
            )
    }

    /// The latest acknowledgement on this session.
    fn acked(&self) -> watch::Receiver<Acked> {
        match self {
            Self::Quic(s) => s.acked(),
            Self::Grpc(s) => s.acked(),
        }
    }

    /// Whether the sink takes compressed batches.
    fn accepts_zstd(&self) -> bool {
        match self {
            Self::Quic(s) => s.accepts_zstd,
            Self::Grpc(s) => s.accepts_zstd,
        }
    }

    /// Writes one batch; with `catch_up` (the agent's live rate), marked as catch-up.
    async fn send(&mut self, frame: &Record, catch_up: Option<u32>) -> Result<(), String> {
        let mut bytes = frame_for(frame, self.accepts_zstd())?;
        if let Some(live) = catch_up {
            bytes = proto::wire::mark_catch_up(&bytes, live);
        }
        match self {
            Self::Quic(s) => s.send(bytes).await,
            Self::Grpc(s) => s.send(bytes).await,
        }
    }

    /// Resolves, with the reason, when the session has failed or the sink has ended it.
    async fn broken(&self) -> String {
        match self {
            Self::Quic(s) => s.broken().await,
            Self::Grpc(s) => s.broken().await,
        }
    }

    /// No more frames: tell the sink, which acknowledges what it has and ends its side.
    fn finish(&mut self) {
        match self {
            Self::Quic(s) => s.finish(),
            Self::Grpc(s) => s.finish(),
        }
    }

    fn close(self, reason: &str) {
        match self {
            Self::Quic(s) => s.close(reason),
            Self::Grpc(s) => drop(s),
        }
    }
}

/// The latest acknowledgement of a session: (agent session, batch sequence). Acknowledgements
/// are cumulative: the sink acknowledges batches in the order it received them.
pub(crate) type Acked = Option<(u64, u64)>;

/// The frame to send a sink: as it is when the sink takes compressed batches, else with its
/// datagrams expanded (a sink older than compression; or batches compressed, and spooled,
/// before this agent's compression was turned off).
fn frame_for(record: &Record, accepts_zstd: bool) -> Result<bytes::Bytes, String> {
    if accepts_zstd {
        return Ok(record.bytes.clone());
    }
    proto::compression::plain_frame(&record.bytes, proto::wire::DEFAULT_MAX_FRAME_LEN)
        .map_err(|e| format!("batch {} cannot be sent uncompressed: {e}", record.sequence))
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
    Broken(String),
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

impl Credentials {
    /// Both configurations from a checked set of files.
    pub(crate) fn new(
        loaded: &certs::Loaded,
        transport: &Arc<quinn::TransportConfig>,
    ) -> Result<Self, String> {
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
    ) -> Result<(), String> {
        let (quic, grpc) = Self::build(loaded, transport)?;
        self.quic.set(quic);
        self.grpc.set(grpc);
        Ok(())
    }

    fn build(
        loaded: &certs::Loaded,
        transport: &Arc<quinn::TransportConfig>,
    ) -> Result<(quinn::ClientConfig, tokio_rustls::rustls::ClientConfig), String> {
        // ALPN_ZSTD is offered always: a sink that picks it accepts compressed batches (and
        // plain ones).
        let tls = certs::client_config(&loaded.ca, &loaded.identity, proto::RELAY_ALPNS)
            .map_err(|e| e.to_string())?;
        let grpc = certs::client_config(&loaded.ca, &loaded.identity, &[proto::GRPC_ALPN])
            .map_err(|e| e.to_string())?;
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
        let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
        quic.transport_config(transport.clone());
        Ok((quic, grpc))
    }
}

/// Opens sessions to one sink, by its transport mode.
pub(crate) struct Dialer {
    pub(crate) sink: SinkConfig,
    pub(crate) quic: Arc<quic::Connector>,
    pub(crate) grpc: Arc<grpc::Connector>,
    pub(crate) metrics: Arc<SinkMetrics>,
    pub(crate) connect_timeout: Duration,
    pub(crate) quic_fallback_after: Duration,
    pub(crate) quic_retry_interval: Duration,
}

impl Dialer {
    /// One connection attempt.
    async fn connect(&self) -> Result<Session, String> {
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
                    Err(grpc_reason) => Err(format!("QUIC: {quic_reason}; gRPC: {grpc_reason}")),
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

impl Link {
    /// Runs until the backlog is closed and everything in it is acknowledged, or (when the
    /// sink cannot be reached) on disk for the next run.
    pub(crate) async fn run(mut self) {
        let backlog = self.backlog.clone();
        loop {
            // While connecting, also watch for the end: an agent shutting down whose batches
            // for this sink are all acknowledged or spooled need not wait for a handshake
            // that may never complete.
            let attempt = tokio::select! {
                result = self.dialer.connect() => result,
                () = backlog.settled() => {
                    self.stopping("shutting down: nothing left to send to this sink");
                    return;
                }
            };
            let mut session = match attempt {
                Ok(session) => session,
                Err(reason) => {
                    self.dialer.metrics.connect_failed(failure_kind(&reason));
                    let wait = self.backoff.next_delay();
                    tracing::warn!(sink = %self.dialer.sink.addr, %reason, retry_in = ?wait, "cannot connect to sink");
                    if !self.pause(wait).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                if self.dialer.metrics.connects.get() > 0 {
                    self.dialer.metrics.reconnects.inc();
                }
                self.dialer.metrics.connects.inc();
                self.dialer.metrics.set_transport(session.in_use());
                tracing::info!(
                    sink = %self.dialer.sink.addr,
                    remote = %session.remote(),
                    transport = session.transport(),
                    sink_certificate_expires = %session.sink_certificate_expires(),
                    sink_accepts_compression = session.accepts_zstd(),
                    "connected to sink"
                );
                let mut window = Window::default();
                let ended = self.stream(&mut session, &mut window).await;
                self.dialer.metrics.set_transport(InUse::None);
                // Only these can reach the sink twice; the rest of the backlog was never sent.
                let unacknowledged = window.batches.len();
                let (backlog_batches, _, _) = self.backlog.pending();
                match ended {
                    Ended::Shutdown => {
                        session.close("agent shutting down");
                        return;
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
                            transport = session.transport(),
                            %reason,
                            unacknowledged_batches = unacknowledged,
                            backlog_batches,
                            retry_in = ?wait,
                            "connection to sink lost; reconnecting (unacknowledged batches will be sent again)"
                        );
                        session.close("connection lost");
                        if !self.pause(wait).await {
                            return;
                        }
                        break;
                    }
                }
            }
        }
    }

    /// The sink has acknowledged `settled`.
    fn release(&mut self, settled: Settled) {
        self.released = self.released.max(settled.through);
        self.backlog.release_through(settled.through);
        let metrics = &self.dialer.metrics;
        metrics.batches_acknowledged.inc_by(settled.batches);
        metrics.datagrams_acknowledged.inc_by(settled.datagrams);
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
        let mut acked = session.acked();
        // Everything not acknowledged goes (again), oldest first.
        let mut cursor = self.released;
        let mut finishing = false;
        // In TLS 1.3 the sink checks our certificate after our side of the handshake is done,
        // so "connected" is not yet "accepted". The backoff resets only once the sink has
        // acknowledged something or the connection has stayed up a while; a refused agent
        // keeps backing off instead of hammering the sink.
        let mut proven = false;
        let healthy_after = Instant::now() + HEALTHY_AFTER;
        let mut last_progress = Instant::now();
        let probing = self.dialer.sink.transport == TransportMode::Auto
            && matches!(session, Session::Grpc(_));
        let probe = probe_quic(
            self.dialer.quic.clone(),
            probing,
            self.dialer.quic_retry_interval,
            self.dialer.quic_fallback_after,
        );
        tokio::pin!(probe);
        loop {
            if !proven && Instant::now() >= healthy_after {
                proven = true;
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
                        return Ended::Broken(session.broken().await);
                    }
                    if let Some(settled) = in_flight.settle(*acked.borrow_and_update()) {
                        self.release(settled);
                        last_progress = Instant::now();
                        if !proven {
                            proven = true;
                            self.backoff.reset();
                        }
                    }
                }
                reason = session.broken() => return Ended::Broken(reason),
                () = tokio::time::sleep_until(healthy_after), if !proven => {}
                () = tokio::time::sleep_until(last_progress + SPOOLED_PATIENCE), if backlog.is_settled() => {
                    if Instant::now() >= last_progress + SPOOLED_PATIENCE && backlog.is_settled() {
                        self.stopping("shutting down: the sink is not acknowledging; the rest stays in the spool");
                        return Ended::Shutdown;
                    }
                }
                next = &mut probe => {
                    // Nothing more goes on gRPC; what went is, with luck, acknowledged before
                    // QUIC takes over (what is not will be sent again, and recognised).
                    session.finish();
                    let drained = tokio::time::timeout(SWITCH_DRAIN, async {
                        while !in_flight.is_empty() {
                            tokio::select! {
                                changed = acked.changed() => {
                                    if changed.is_err() { return; }
                                    if let Some(settled) = in_flight.settle(*acked.borrow_and_update()) {
                                        self.release(settled);
                                    }
                                }
                                _ = session.broken() => return,
                            }
                        }
                    })
                    .await;
                    // The call ends when the sink has acknowledged what it got and finished
                    // its side: that last acknowledgement may not have been taken above.
                    if let Some(settled) = in_flight.settle(*acked.borrow_and_update()) {
                        self.release(settled);
                    }
                    if drained.is_err() || !in_flight.is_empty() {
                        tracing::warn!(sink = %self.dialer.sink.addr, "moving to QUIC before the sink acknowledged everything sent over gRPC; the rest is sent again");
                    }
                    return Ended::Switch(Box::new(next));
                }
                record = backlog.next_after(cursor), if !finishing && in_flight.bytes < self.window_bytes => {
                    let Some(record) = record else {
                        // Closed and all sent: finish the stream, wait for the last acks.
                        finishing = true;
                        session.finish();
                        continue;
                    };
                    let resend = record.id <= self.sent_through;
                    let live = self
                        .live_rate
                        .update(Instant::now(), backlog.appended_datagrams());
                    let catch_up = is_catch_up(&record, resend, in_flight.catch_up, live)
                        .then_some(live);
                    if let Err(reason) = session.send(&record, catch_up).await {
                        return Ended::Broken(reason);
                    }
                    cursor = record.id;
                    last_progress = Instant::now();
                    if resend {
                        self.dialer.metrics.batches_resent.inc();
                    }
                    if catch_up.is_some() {
                        self.dialer.metrics.catch_up_datagrams_sent.inc_by(record.datagrams);
                    }
                    self.sent_through = self.sent_through.max(record.id);
                    in_flight.push(&record, catch_up.is_some());
                    self.dialer.metrics.batches_sent.inc();
                    self.dialer.metrics.datagrams_sent.inc_by(record.datagrams);
                    self.dialer.metrics.bytes_sent.inc_by(record.bytes.len() as u64);
                }
            }
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
    quic: Arc<quic::Connector>,
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
                tracing::debug!(sink = %quic.sink_addr(), %reason, "QUIC still unavailable")
            }
        }
    }
}

/// Resolves `HOST:PORT` to its first address.
async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))
}

/// Turns the usual TLS refusals into advice. The sink refusing us (it closes the connection
/// or sends a TLS alert: "aborted by peer" in quinn's words, "received fatal alert" in
/// rustls's) is told apart from us refusing the sink (our own verification failing).
fn explain(sink: &SinkConfig, error: &str) -> String {
    if error.contains("aborted by peer")
        || error.contains("fatal alert")
        || error.contains("right after the TLS handshake")
    {
        format!("the sink refused this agent's certificate or the handshake: {error}")
    } else if error.contains("NotValidForName") || error.contains("not valid for name") {
        format!(
            "the sink's certificate is not valid for the name {:?}: set --server-name to a name in its certificate ({error})",
            sink.server_name
        )
    } else if error.contains("UnknownIssuer") || error.contains("BadSignature") {
        format!(
            "the sink's certificate is not signed by the CA in {} ({error})",
            sink.ca.display()
        )
    } else if error.contains("certificate") {
        format!("certificate check failed: {error}")
    } else {
        error.to_owned()
    }
}

/// The `reason` label of a failed attempt, from its (explained) text. With `auto`, the gRPC
/// attempt is the one that failed last and decides.
fn failure_kind(error: &str) -> ConnectFailure {
    let error = error.rsplit_once("gRPC: ").map_or(error, |(_, grpc)| grpc);
    if error.starts_with("the sink refused this agent's certificate") {
        ConnectFailure::Refused
    } else if error.starts_with("the sink's certificate")
        || error.starts_with("certificate check failed")
    {
        ConnectFailure::UntrustedSink
    } else if error.contains(" within ") || error.contains("timed out") {
        ConnectFailure::Timeout
    } else if error.contains("refused")
        || error.contains("unreachable")
        || error.contains("No route")
    {
        ConnectFailure::Unreachable
    } else {
        ConnectFailure::Other
    }
}

#[cfg(test)]
mod explain_tests {
    use super::*;

    fn sink() -> SinkConfig {
        SinkConfig {
            addr: "sink:4433".into(),
            server_name: "sink".into(),
            ca: "ca.pem".into(),
            cert: "a.pem".into(),
            key: "a.key".into(),
            backlog_bytes: 1,
            transport: TransportMode::Auto,
        }
    }

    #[test]
    fn failures_are_labelled_by_what_went_wrong() {
        let refused = explain(
            &sink(),
            "aborted by peer: the cryptographic handshake failed",
        );
        assert_eq!(failure_kind(&refused), ConnectFailure::Refused);
        let untrusted = explain(&sink(), "invalid peer certificate: UnknownIssuer");
        assert_eq!(failure_kind(&untrusted), ConnectFailure::UntrustedSink);
        assert_eq!(
            failure_kind("no QUIC handshake with 192.0.2.1:4433 within 3s"),
            ConnectFailure::Timeout
        );
        assert_eq!(
            failure_kind(
                "QUIC: no QUIC handshake within 3s; gRPC: sink:4433: Connection refused (os error 111)"
            ),
            ConnectFailure::Unreachable
        );
        assert_eq!(
            failure_kind("cannot resolve sink:4433: nope"),
            ConnectFailure::Other
        );
    }

    #[test]
    fn the_sink_refusing_us_is_not_mistaken_for_us_refusing_it() {
        let refused_quic = "aborted by peer: the cryptographic handshake failed: error 48: invalid peer certificate: UnknownIssuer";
        let refused_grpc = "Unknown: transport error: received fatal alert: UnknownCA";
        for text in [refused_quic, refused_grpc] {
            assert!(
                explain(&sink(), text).starts_with("the sink refused this agent's certificate"),
                "{text}"
            );
        }
        let ours =
            "the cryptographic handshake failed: error 48: invalid peer certificate: UnknownIssuer";
        assert!(
            explain(&sink(), ours)
                .starts_with("the sink's certificate is not signed by the CA in ca.pem")
        );
        let name = "invalid peer certificate: NotValidForName";
        assert!(explain(&sink(), name).contains("set --server-name"));
    }
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
            bytes: bytes::Bytes::new(),
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

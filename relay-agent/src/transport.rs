//! Carrying frames to sinks. One link per sink, each with its own queue, connection and
//! reconnect schedule, so a dead sink holds back no other.
//!
//! A link holds one [`Session`] at a time, over QUIC ([`quic`]) or gRPC ([`grpc`]); both carry
//! the same frames and bring back the same acknowledgements, so everything above the session
//! (queueing, in-flight accounting, backoff, shutdown) is written once, here.
//!
//! With [`TransportMode::Auto`] a link tries QUIC first and, when no QUIC handshake completes
//! within `quic_fallback_after`, carries on over gRPC. While on gRPC it tries QUIC again every
//! `quic_retry_interval`; when that works it stops taking frames from the queue, lets the gRPC
//! call finish and waits for the sink to acknowledge everything sent on it, then goes on over
//! QUIC. Frames not yet taken stay queued, so the switch loses and repeats nothing.
//!
//! Delivery today: frames written to a connection that breaks before the sink acknowledges
//! them are counted as lost (`dropped_connection_lost`) and never written twice: the sink
//! may have replayed them, and a duplicate would distort the analyzer's counters.

pub(crate) mod grpc;
pub(crate) mod quic;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::batch::Frame;
use crate::config::{SinkConfig, TransportMode};
use crate::metrics::{self, SinkMetrics};

/// A connection that lasts this long counts as accepted, even with nothing to send.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Moving from gRPC back to QUIC waits at most this long for the sink to acknowledge what was
/// sent over gRPC.
const SWITCH_DRAIN: Duration = Duration::from_secs(10);

/// Acks are tiny; anything larger is a broken peer.
const MAX_ACK_LEN: usize = 1024;

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

    fn gauge(&self) -> u64 {
        match self {
            Self::Quic(_) => 1,
            Self::Grpc(_) => 2,
        }
    }

    fn remote(&self) -> SocketAddr {
        match self {
            Self::Quic(s) => s.remote(),
            Self::Grpc(s) => s.remote(),
        }
    }

    /// The highest sequence the sink has acknowledged on this session.
    fn acked(&self) -> watch::Receiver<u64> {
        match self {
            Self::Quic(s) => s.acked(),
            Self::Grpc(s) => s.acked(),
        }
    }

    /// Writes one frame. An error means the frame was not (wholly) written: it cannot have
    /// been replayed, and may go on the next session.
    async fn send(&mut self, frame: &Frame) -> Result<(), String> {
        match self {
            Self::Quic(s) => s.send(frame).await,
            Self::Grpc(s) => s.send(frame).await,
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

/// Records an acknowledgement from the sink (both transports' ack readers call this).
fn acknowledged(metrics: &SinkMetrics, acked: &watch::Sender<u64>, sequence: u64) {
    metrics
        .acked_sequence
        .fetch_max(sequence, std::sync::atomic::Ordering::Relaxed);
    acked.send_if_modified(|seen| {
        let newer = sequence > *seen;
        *seen = (*seen).max(sequence);
        newer
    });
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
                        metrics::add(&self.metrics.fallbacks_to_grpc, 1);
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
    pub(crate) sink: SinkConfig,
    pub(crate) dialer: Dialer,
    pub(crate) queue: mpsc::Receiver<Frame>,
    pub(crate) metrics: Arc<SinkMetrics>,
    pub(crate) backoff: Backoff,
    /// (sequence, datagrams) of batches written and not yet acknowledged.
    pub(crate) in_flight: VecDeque<(u64, u64)>,
}

impl Link {
    /// Runs until the queue is closed and drained, everything sent is acknowledged (or the
    /// connection is lost during that wait), and the connection is closed.
    pub(crate) async fn run(mut self) {
        let mut carry: Option<Frame> = None;
        loop {
            // While connecting, also watch the queue: a closed, empty queue means the agent is
            // shutting down with nothing for this sink, and a handshake that may never
            // complete (an unreachable sink) must not hold the shutdown up.
            let attempt = {
                let connecting = self.dialer.connect();
                tokio::pin!(connecting);
                loop {
                    tokio::select! {
                        result = &mut connecting => break result,
                        frame = self.queue.recv(), if carry.is_none() => match frame {
                            Some(frame) => carry = Some(frame),
                            None => {
                                tracing::info!(sink = %self.sink.addr, "shutting down: nothing left to send to this sink");
                                return;
                            }
                        },
                    }
                }
            };
            let mut session = match attempt {
                Ok(session) => session,
                Err(reason) => {
                    metrics::add(&self.metrics.connect_failures, 1);
                    let wait = self.backoff.next_delay();
                    tracing::warn!(sink = %self.sink.addr, %reason, retry_in = ?wait, "cannot connect to sink");
                    if !self.pause(wait, &mut carry).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                metrics::add(&self.metrics.connects, 1);
                metrics::set(&self.metrics.transport, session.gauge());
                tracing::info!(
                    sink = %self.sink.addr,
                    remote = %session.remote(),
                    transport = session.transport(),
                    "connected to sink"
                );
                let ended = self.stream(&mut session, &mut carry).await;
                metrics::set(&self.metrics.transport, 0);
                let unacknowledged = self.forget_unacknowledged(&session);
                match ended {
                    Ended::Shutdown => {
                        session.close("agent shutting down");
                        return;
                    }
                    Ended::Switch(next) => {
                        metrics::add(&self.metrics.returns_to_quic, 1);
                        tracing::info!(
                            sink = %self.sink.addr,
                            unacknowledged_datagrams = unacknowledged,
                            reason = "a QUIC handshake completed again",
                            "transport changed: gRPC to QUIC"
                        );
                        std::mem::replace(&mut session, *next).close("moving to QUIC");
                    }
                    Ended::Broken(reason) => {
                        let wait = self.backoff.next_delay();
                        tracing::warn!(
                            sink = %self.sink.addr,
                            transport = session.transport(),
                            %reason,
                            unacknowledged_datagrams = unacknowledged,
                            retry_in = ?wait,
                            "connection to sink lost; reconnecting"
                        );
                        session.close("connection lost");
                        if !self.pause(wait, &mut carry).await {
                            return;
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Batches written on `session` but not acknowledged may or may not have been replayed;
    /// without resending (planned) they count as lost. Returns their datagrams.
    fn forget_unacknowledged(&mut self, session: &Session) -> u64 {
        let acked = *session.acked().borrow();
        self.in_flight.retain(|&(sequence, _)| sequence > acked);
        let lost = self
            .in_flight
            .drain(..)
            .map(|(_, datagrams)| datagrams)
            .sum();
        metrics::add(&self.metrics.dropped_connection_lost, lost);
        lost
    }

    /// Waits `wait` before the next attempt, taking a frame from the queue meanwhile (so a
    /// closed queue is noticed). Returns false when the queue has closed with nothing left to
    /// send: the agent is shutting down and there is no reason to retry.
    async fn pause(&mut self, wait: Duration, carry: &mut Option<Frame>) -> bool {
        let until = Instant::now() + wait;
        if carry.is_none() {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                frame = self.queue.recv() => match frame {
                    Some(frame) => *carry = Some(frame),
                    None => {
                        tracing::info!(sink = %self.sink.addr, "sink unreachable and nothing left to send");
                        return false;
                    }
                },
            }
        }
        tokio::time::sleep_until(until).await;
        true
    }

    /// Streams frames on one session until the queue closes, the session breaks, or (`auto` on
    /// gRPC) QUIC works again.
    async fn stream(&mut self, session: &mut Session, carry: &mut Option<Frame>) -> Ended {
        let mut acked = session.acked();
        let mut last_sent = 0u64;
        // In TLS 1.3 the sink checks our certificate after our side of the handshake is done,
        // so "connected" is not yet "accepted". The backoff resets only once the sink has
        // acknowledged something or the connection has stayed up a while; a refused agent
        // keeps backing off instead of hammering the sink.
        let mut proven = false;
        let healthy_after = Instant::now() + HEALTHY_AFTER;
        let probing =
            self.sink.transport == TransportMode::Auto && matches!(session, Session::Grpc(_));
        let probe = probe_quic(
            self.dialer.quic.clone(),
            probing,
            self.dialer.quic_retry_interval,
            self.dialer.quic_fallback_after,
        );
        tokio::pin!(probe);
        loop {
            if !proven && (*acked.borrow() > 0 || Instant::now() >= healthy_after) {
                proven = true;
                self.backoff.reset();
            }
            let frame = match carry.take() {
                Some(frame) => Some(frame),
                None => tokio::select! {
                    frame = self.queue.recv() => frame,
                    reason = session.broken() => return Ended::Broken(reason),
                    () = tokio::time::sleep_until(healthy_after), if !proven => continue,
                    next = &mut probe => {
                        // Nothing more goes on gRPC; what went is acknowledged before QUIC
                        // takes over, so the sink replays it all, once, in order.
                        session.finish();
                        let drained = tokio::time::timeout(
                            SWITCH_DRAIN,
                            drain(session, &mut acked, last_sent),
                        )
                        .await
                        .unwrap_or(false);
                        if !drained {
                            tracing::warn!(sink = %self.sink.addr, "moving to QUIC before the sink acknowledged everything sent over gRPC");
                        }
                        return Ended::Switch(Box::new(next));
                    }
                },
            };
            let Some(frame) = frame else { break };
            if let Err(reason) = session.send(&frame).await {
                *carry = Some(frame);
                return Ended::Broken(reason);
            }
            last_sent = frame.sequence;
            self.in_flight.push_back((frame.sequence, frame.datagrams));
            let acked_now = *acked.borrow();
            while self
                .in_flight
                .front()
                .is_some_and(|&(sequence, _)| sequence <= acked_now)
            {
                self.in_flight.pop_front();
            }
            metrics::add(&self.metrics.batches_sent, 1);
            metrics::add(&self.metrics.datagrams_sent, frame.datagrams);
        }
        // The queue is closed: the agent is shutting down. Finish the stream and wait for the
        // sink to acknowledge the last batch (the caller bounds this wait).
        session.finish();
        if drain(session, &mut acked, last_sent).await {
            self.in_flight.clear();
            tracing::info!(sink = %self.sink.addr, last_sequence = last_sent, "all batches acknowledged");
        } else {
            tracing::warn!(sink = %self.sink.addr, "connection closed before all batches were acknowledged");
        }
        Ended::Shutdown
    }
}

/// Waits until the sink has acknowledged `last_sent`; false when the session ends first.
async fn drain(session: &Session, acked: &mut watch::Receiver<u64>, last_sent: u64) -> bool {
    tokio::select! {
        biased;
        result = acked.wait_for(|&sequence| sequence >= last_sent) => return result.is_ok(),
        _ = session.broken() => {}
    }
    *acked.borrow() >= last_sent
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
            queue_batches: 1,
            transport: TransportMode::Auto,
        }
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

//! Where batches come in. Each transport turns authenticated agent connections into calls of
//! [`deliver`] (which hands the batch to [`Replay`](crate::replay::Replay)) plus
//! acknowledgements. What the transports share (refusal logging, delivery) lives here, so QUIC
//! and gRPC agents are treated alike.

pub(crate) mod grpc;
pub(crate) mod quic;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::compression::CompressionError;
use proto::pb;
use proto::wire::WireError;
use runtime::ratelimit::RateLimit;

use rustls::pki_types::CertificateDer;

use crate::Shared;
use crate::catch_up::Paced;
use crate::replay::Replaying;
use crate::status::{Connection, Registered};

/// The transport an agent came in on, as a log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Quic,
    Grpc,
}

impl Transport {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Grpc => "grpc",
        }
    }
}

/// Counts and logs a refused or failed handshake: one WARN line with `security_event`, the
/// peer, the reason and the subject of the certificate it presented, at most ten a second per
/// kind of refusal, each saying how many were held back before it.
pub(crate) fn refused(shared: &Shared, transport: Transport, remote: SocketAddr, reason: &str) {
    let kind = RefusalKind::of(reason);
    shared.metrics.refused(kind).inc();
    if let Some(more) = shared.refusals.check(kind) {
        // The subject is what the peer claimed; nothing vouches for a refused certificate.
        tracing::warn!(
            security_event = "tls_handshake_refused",
            %remote,
            transport = transport.as_str(),
            kind = kind.as_str(),
            presented_subject = certs::presented_subject(reason).unwrap_or("-"),
            %reason,
            earlier_refusals_not_logged = more,
            "agent refused: TLS handshake failed"
        );
    }
}

/// Checks an authenticated agent against the authorization in force (revocation, allow-list)
/// and the per-identity connection limit, and registers its connection if it passes. A
/// refusal is counted and logged (rate-limited, as handshake refusals are) with the agent's
/// name, which the CA vouches for.
pub(crate) fn admit(
    shared: &Shared,
    transport: Transport,
    remote: SocketAddr,
    chain: Option<&[CertificateDer<'_>]>,
) -> Result<Registered, RefusalKind> {
    let agent: Arc<str> = chain
        .and_then(certs::load::peer_name)
        .unwrap_or_else(|| "unnamed".into())
        .into();
    let cert = chain
        .and_then(|chain| chain.first())
        .and_then(|leaf| certs::CertInfo::from_der(leaf).ok());
    let subject = cert.as_ref().map(|c| c.subject.clone());
    let admitted = shared
        .policy
        .get()
        .check(&agent, cert.as_ref())
        .and_then(|()| {
            shared.agents.connect(
                agent.clone(),
                remote,
                transport,
                cert,
                shared.config.max_connections_per_agent,
            )
        });
    if let Err(kind) = admitted {
        shared.metrics.refused(kind).inc();
        if let Some(more) = shared.refusals.check(kind) {
            tracing::warn!(
                security_event = "tls_handshake_refused",
                %remote,
                transport = transport.as_str(),
                kind = kind.as_str(),
                %agent,
                presented_subject = subject.as_deref().unwrap_or("-"),
                reason = kind.words(),
                earlier_refusals_not_logged = more,
                "agent refused: not authorized"
            );
        }
    }
    admitted
}

/// Counts and logs the closing of a live connection whose agent a reload has revoked or taken
/// off the allow-list (not rate-limited: one line per connection an operator's change ends).
pub(crate) fn closed_by_policy(shared: &Shared, connection: &Connection, kind: RefusalKind) {
    shared.metrics.closed(kind).inc();
    tracing::warn!(
        security_event = "agent_disconnected",
        agent = %connection.agent,
        remote = %connection.remote(),
        transport = connection.transport().as_str(),
        kind = kind.as_str(),
        reason = kind.words(),
        "agent disconnected: no longer authorized"
    );
}

/// Counts and logs (rate-limited) a handshake that did not complete in time.
pub(crate) fn timed_out(shared: &Shared, transport: Transport, remote: SocketAddr) {
    shared.metrics.refused(RefusalKind::Timeout).inc();
    if let Some(more) = shared.refusals.check(RefusalKind::Timeout) {
        tracing::warn!(
            security_event = "tls_handshake_refused",
            %remote,
            transport = transport.as_str(),
            presented_subject = "-",
            reason = "handshake timeout",
            kind = RefusalKind::Timeout.as_str(),
            earlier_refusals_not_logged = more,
            "agent refused: TLS handshake did not complete in time"
        );
    }
}

/// Counts a protocol violation and logs it (not rate-limited: it ends an authenticated
/// agent's connection, which is rare and always worth knowing).
pub(crate) fn violation(
    shared: &Shared,
    transport: Transport,
    agent: &str,
    remote: SocketAddr,
    kind: Violation,
    error: &str,
) {
    shared.metrics.protocol_error(kind).inc();
    tracing::warn!(%agent, %remote, transport = transport.as_str(), reason = kind.as_str(), %error, "protocol violation: the agent's stream is ended");
}

/// Counts and logs (at most one line a second, with the count held back) a connection refused
/// because `--max-connections` are open.
pub(crate) fn over_limit(shared: &Shared, transport: Transport, remote: SocketAddr) {
    shared.metrics.connections_refused_max.inc();
    if let Some(more) = shared.limits_log.check() {
        tracing::warn!(
            security_event = "connection_limit",
            %remote,
            transport = transport.as_str(),
            reason = "max_connections",
            max_connections = shared.config.max_connections,
            earlier_refusals_not_logged = more,
            "connection refused: --max-connections reached"
        );
    }
}

/// Why an agent's stream was ended: the `reason` label of `relay_sink_protocol_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Violation {
    /// A frame or gRPC message over `--max-frame-bytes`.
    FrameTooLarge,
    /// A frame that does not decode.
    Malformed,
    /// The stream ended inside a frame.
    Truncated,
    /// A frame still incomplete `--frame-timeout` after it began.
    FrameTimeout,
    /// A compressed batch that states it expands beyond `--max-frame-bytes`.
    DecompressedTooLarge,
    /// A compressed batch without its size, corrupt, or not expanding to datagrams.
    Compression,
}

impl Violation {
    pub(crate) const ALL: [Self; 6] = [
        Self::FrameTooLarge,
        Self::Malformed,
        Self::Truncated,
        Self::FrameTimeout,
        Self::DecompressedTooLarge,
        Self::Compression,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::FrameTooLarge => "frame_too_large",
            Self::Malformed => "malformed",
            Self::Truncated => "truncated",
            Self::FrameTimeout => "frame_timeout",
            Self::DecompressedTooLarge => "decompressed_too_large",
            Self::Compression => "compression",
        }
    }

    pub(crate) fn of_wire(error: &WireError) -> Self {
        match error {
            WireError::FrameTooLarge { .. } => Self::FrameTooLarge,
            WireError::TruncatedFrame { .. } => Self::Truncated,
            WireError::Malformed(_) | WireError::Io(_) => Self::Malformed,
        }
    }

    pub(crate) fn of_compression(error: &CompressionError) -> Self {
        match error {
            CompressionError::TooLarge { .. } => Self::DecompressedTooLarge,
            _ => Self::Compression,
        }
    }
}

/// A batch handed to [`deliver`]: its acknowledgement, to send once `replaying` (if any) has
/// finished.
pub(crate) struct Delivery {
    pub(crate) ack: pb::Ack,
    /// `None` for a duplicate: already replayed, acknowledged at once.
    pub(crate) replaying: Option<Arc<Replaying>>,
}

impl Delivery {
    /// Waits until the batch has been replayed; then it may be acknowledged.
    pub(crate) async fn replayed(self) -> pb::Ack {
        if let Some(replaying) = &self.replaying {
            replaying.finished().await;
        }
        self.ack
    }
}

/// Hands a batch from an agent's `connection` to replay, unless this agent's session has
/// already had it replayed (a resend after a reconnect), which is counted and not replayed
/// again.
pub(crate) async fn deliver(
    shared: &Shared,
    connection: &Connection,
    mut batch: pb::Batch,
) -> Delivery {
    let agent = &*connection.agent;
    let ack = pb::Ack {
        session: batch.session,
        sequence: batch.sequence,
    };
    let datagrams = batch.datagrams.len() as u64;
    let bytes = batch.datagrams.iter().map(|d| d.payload.len() as u64).sum();
    let metrics = &shared.metrics;
    metrics.batches_received.inc();
    metrics.datagrams_received.inc_by(datagrams);
    metrics.bytes_received.inc_by(bytes);
    connection.received(datagrams, bytes);
    if let Seen::Before(original) = shared.replayed.check(agent, ack.session, ack.sequence) {
        metrics.batches_duplicate.inc();
        metrics.datagrams_duplicate.inc_by(datagrams);
        tracing::debug!(%agent, session = ack.session, sequence = ack.sequence, "duplicate batch (already replayed): acknowledged, not replayed");
        // Acknowledged once the session's latest replay (which includes the original, or
        // follows it) is done, so an acknowledgement still means "replayed".
        return Delivery {
            ack,
            replaying: original,
        };
    }
    tracing::trace!(%agent, sequence = ack.sequence, datagrams, "batch");
    // Only a batch that is to be replayed spends the agent's rate (a resend is dropped whole).
    shared.paces.limit(shared, connection, &mut batch);
    metrics
        .sflow
        .observe(batch.datagrams.iter().map(|d| &d.payload[..]));
    let replaying = match Paced::of(&batch) {
        None => shared.replay.submit(batch).await,
        Some(paced) => catch_up(shared, connection, paced, batch).await,
    };
    shared
        .replayed
        .replaying(agent, ack.session, ack.sequence, &replaying);
    Delivery {
        ack,
        replaying: Some(replaying),
    }
}

/// Hands a catch-up batch to replay at the catch-up pace, waiting on this connection alone:
/// in slices of at most the pace's burst, each once the pace allows it, so a collector gets
/// no larger burst from a draining backlog than the pace's (other agents' batches go between
/// the slices). Returns the last slice's replay: a destination replays in order, so when it
/// is done, so is the batch.
async fn catch_up(
    shared: &Shared,
    connection: &Connection,
    paced: Paced,
    mut batch: pb::Batch,
) -> Arc<Replaying> {
    let metrics = &shared.metrics;
    metrics.catch_up(paced).inc_by(batch.datagrams.len() as u64);
    let live = batch.live_datagrams_per_second;
    let slice = shared.catch_up.burst();
    let mut rest = std::mem::take(&mut batch.datagrams);
    loop {
        let tail = rest.split_off(slice.min(rest.len()));
        let datagrams = std::mem::replace(&mut rest, tail);
        let wait = shared.catch_up.wait_for(
            Some(paced),
            live,
            &connection.catch_up,
            datagrams.len() as u64,
        );
        if !wait.is_zero() {
            metrics.catch_up_wait_seconds.inc_by(wait.as_secs_f64());
            tokio::time::sleep(wait).await;
        }
        let part = pb::Batch {
            datagrams,
            ..batch.clone()
        };
        let replaying = shared.replay.submit(part).await;
        if rest.is_empty() {
            return replaying;
        }
    }
}

/// The per-datagram limits on what an agent's batch may carry: `--max-datagram-bytes` for
/// each datagram and `--agent-max-pps` for each agent identity (the name in its certificate,
/// all its connections together). Datagrams over a limit are taken out of the batch and
/// counted per agent; the rest is replayed and the batch acknowledged as usual (an agent that
/// resent it would only be dropped again).
#[derive(Debug, Default)]
pub(crate) struct Paces {
    buckets: std::sync::Mutex<HashMap<Arc<str>, Bucket>>,
    log: DropLog,
}

/// A token bucket holding up to one second of `--agent-max-pps`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One WARN line per 10 s at most for the datagrams dropped by [`Paces`].
#[derive(Debug)]
struct DropLog(RateLimit);

impl Default for DropLog {
    fn default() -> Self {
        Self(RateLimit::new(Duration::from_secs(10)))
    }
}

impl Bucket {
    /// Refills for the time since the last call (up to one second of `rate`), then takes up
    /// to `n` tokens; returns how many it took.
    fn take(&mut self, now: Instant, rate: f64, n: usize) -> usize {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.at = now;
        let allowed = (self.tokens.floor() as usize).min(n);
        self.tokens -= allowed as f64;
        allowed
    }
}

impl Paces {
    fn limit(&self, shared: &Shared, connection: &Connection, batch: &mut pb::Batch) {
        let config = &shared.config;
        let max_len = config.max_datagram_bytes;
        let before = batch.datagrams.len();
        batch.datagrams.retain(|d| d.payload.len() <= max_len);
        let too_large = before - batch.datagrams.len();
        let mut rate_limited = 0;
        if config.agent_max_pps > 0 && !batch.datagrams.is_empty() {
            let rate = config.agent_max_pps as f64;
            let now = Instant::now();
            let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            let bucket = buckets.entry(connection.agent.clone()).or_insert(Bucket {
                tokens: rate,
                at: now,
            });
            let allowed = bucket.take(now, rate, batch.datagrams.len());
            rate_limited = batch.datagrams.len() - allowed;
            batch.datagrams.truncate(allowed);
        }
        if too_large + rate_limited == 0 {
            return;
        }
        connection.dropped(too_large as u64, rate_limited as u64);
        if let Some(more) = self.log.0.check() {
            tracing::warn!(
                agent = %connection.agent,
                too_large,
                rate_limited,
                max_datagram_bytes = max_len,
                agent_max_pps = config.agent_max_pps,
                earlier_drops_not_logged = more,
                "datagrams from this agent over a limit: dropped"
            );
        }
    }
}

/// The last batch sequence replayed per agent session, to drop what an agent resends after a
/// reconnect. Agents send a session's batches in order, so one number per session suffices.
/// Bounded: beyond `MAX_SESSIONS` the least recently seen session is forgotten.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    sessions: std::sync::Mutex<Sessions>,
}

#[derive(Debug, Default)]
struct Sessions {
    /// (agent, session) → (last sequence, when last seen, the replay of that sequence).
    last: HashMap<SessionKey, (u64, u64, std::sync::Weak<Replaying>)>,
    tick: u64,
}

/// An agent's session: (certificate name, session).
type SessionKey = (Arc<str>, u64);

/// What [`Replayed::check`] found.
pub(crate) enum Seen {
    /// A batch this session has not had: replay it.
    New,
    /// Had before; the session's latest replay, if it is still under way.
    Before(Option<Arc<Replaying>>),
}

const MAX_SESSIONS: usize = 16_384;

impl Replayed {
    /// Whether `sequence` is new for this agent's `session` (and, if so, remembers it).
    pub(crate) fn check(&self, agent: &str, session: u64, sequence: u64) -> Seen {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.tick += 1;
        let tick = sessions.tick;
        let key: (Arc<str>, u64) = (agent.into(), session);
        if let Some((last, seen, replaying)) = sessions.last.get_mut(&key) {
            *seen = tick;
            if sequence <= *last {
                return Seen::Before(replaying.upgrade());
            }
            *last = sequence;
            *replaying = std::sync::Weak::new();
            return Seen::New;
        }
        if sessions.last.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .last
                .iter()
                .min_by_key(|(_, (_, seen, _))| *seen)
                .map(|(k, _)| k.clone())
        {
            sessions.last.remove(&oldest);
        }
        sessions
            .last
            .insert(key, (sequence, tick, std::sync::Weak::new()));
        Seen::New
    }

    /// Records the replay of `sequence`, for duplicates of it to wait on.
    pub(crate) fn replaying(
        &self,
        agent: &str,
        session: u64,
        sequence: u64,
        replaying: &Arc<Replaying>,
    ) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((last, _, latest)) = sessions.last.get_mut(&(Arc::from(agent), session))
            && *last == sequence
        {
            *latest = Arc::downgrade(replaying);
        }
    }
}

/// Why a handshake was refused, in a few stable words (a log field, later a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusalKind {
    /// No client certificate.
    NoCertificate,
    /// Signed by a CA we do not trust.
    UnknownIssuer,
    /// A signature that does not verify (often: another CA with the same name as ours).
    BadSignature,
    /// The certificate is not for client authentication (a sink's certificate, say).
    WrongUsage,
    /// Past its validity period.
    Expired,
    /// Before its validity period (or a clock that is wrong, here or where it was issued).
    NotYetValid,
    /// Listed in the `--crl` revocation list.
    Revoked,
    /// Authenticated, but not on the `--allowed-agents` list.
    NotAllowed,
    /// Authenticated, but its identity already holds `--max-connections-per-agent`.
    TooManyConnections,
    /// The handshake did not complete in time.
    Timeout,
    /// Anything else (protocol mismatch, ALPN, garbage).
    Other,
}

impl RefusalKind {
    pub(crate) const ALL: [Self; 11] = [
        Self::NoCertificate,
        Self::UnknownIssuer,
        Self::BadSignature,
        Self::WrongUsage,
        Self::Expired,
        Self::NotYetValid,
        Self::Revoked,
        Self::NotAllowed,
        Self::TooManyConnections,
        Self::Timeout,
        Self::Other,
    ];

    /// Classifies a handshake error's text (rustls's wording, through quinn). Only the text
    /// before the presented subject is read: the subject is the client's to choose.
    pub(crate) fn of(error: &str) -> Self {
        let error = error
            .find("; presented subject \"")
            .map_or(error, |end| &error[..end]);
        if error.contains("no certificates") {
            Self::NoCertificate
        } else if error.contains("UnknownIssuer") {
            Self::UnknownIssuer
        } else if error.contains("BadSignature") {
            Self::BadSignature
        } else if error.contains("extended key usage") || error.contains("InvalidPurpose") {
            Self::WrongUsage
        } else if error.contains("NotValidYet") || error.contains("not valid yet") {
            Self::NotYetValid
        } else if error.contains("Expired") || error.contains("expired") {
            Self::Expired
        } else if error.contains("Revoked") {
            Self::Revoked
        } else {
            Self::Other
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::UnknownIssuer => "unknown_issuer",
            Self::BadSignature => "bad_signature",
            Self::WrongUsage => "wrong_usage",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Revoked => "revoked",
            Self::NotAllowed => "not_allowed",
            Self::TooManyConnections => "too_many_connections",
            Self::Timeout => "timeout",
            Self::Other => "other",
        }
    }

    /// What an authorization refusal tells the agent (QUIC close reason) and the log.
    pub(crate) fn words(self) -> &'static str {
        match self {
            Self::Revoked => "certificate revoked",
            Self::NotAllowed => "agent not on the allow-list",
            Self::TooManyConnections => "too many connections with this agent's identity",
            _ => "refused",
        }
    }
}

/// At most ten log lines a second per kind of refusal: a flood of bad handshakes must not
/// flood the logs, and must not hide a refusal of another kind either.
#[derive(Debug)]
pub(crate) struct Refusals {
    limits: [RateLimit; RefusalKind::ALL.len()],
}

impl Default for Refusals {
    fn default() -> Self {
        Self {
            limits: std::array::from_fn(|_| RateLimit::new(Duration::from_millis(100))),
        }
    }
}

impl Refusals {
    /// `Some(n)` when a refusal of `kind` should be logged (`n` held back since the last).
    pub(crate) fn check(&self, kind: RefusalKind) -> Option<u64> {
        let i = RefusalKind::ALL
            .iter()
            .position(|&k| k == kind)
            .unwrap_or(RefusalKind::ALL.len() - 1);
        self.limits[i].check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_classified_from_rustls_wording() {
        let cases = [
            (
                "the cryptographic handshake failed: error 116: peer sent no certificates",
                RefusalKind::NoCertificate,
            ),
            (
                "the cryptographic handshake failed: error 48: invalid peer certificate: UnknownIssuer",
                RefusalKind::UnknownIssuer,
            ),
            (
                "the cryptographic handshake failed: error 51: invalid peer certificate: BadSignature",
                RefusalKind::BadSignature,
            ),
            (
                "invalid peer certificate: certificate does not allow extended key usage for client authentication",
                RefusalKind::WrongUsage,
            ),
            (
                "invalid peer certificate: certificate expired: verification time 1 (UNIX), but certificate is not valid after 0",
                RefusalKind::Expired,
            ),
            (
                "invalid peer certificate: Other(OtherError(certificate not valid yet: verification time 1 (UNIX), but certificate is not valid before 2 (1 seconds in future); presented subject \"CN=a\"))",
                RefusalKind::NotYetValid,
            ),
            (
                "invalid peer certificate: Other(OtherError(Revoked; presented subject \"CN=site-b\"))",
                RefusalKind::Revoked,
            ),
            (
                "invalid peer certificate: Other(OtherError(UnknownIssuer; presented subject \"CN=Revoked expired\"))",
                RefusalKind::UnknownIssuer,
            ),
            (
                "peer doesn't support any known protocol",
                RefusalKind::Other,
            ),
        ];
        for (text, kind) in cases {
            assert_eq!(RefusalKind::of(text), kind, "{text}");
        }
    }

    #[test]
    fn resent_batches_are_recognised_per_agent_and_session() {
        let replayed = Replayed::default();
        let new = |agent, session, sequence| {
            matches!(replayed.check(agent, session, sequence), Seen::New)
        };
        assert!(new("a", 1, 1));
        assert!(new("a", 1, 2));
        assert!(!new("a", 1, 2), "a resend");
        assert!(!new("a", 1, 1), "an older resend");
        assert!(new("b", 1, 2), "another agent");
        assert!(new("a", 7, 1), "another session of the same agent");
        assert!(new("a", 1, 3));
    }

    #[test]
    fn the_agent_bucket_holds_one_second_and_refills_at_the_rate() {
        let start = Instant::now();
        let mut bucket = Bucket {
            tokens: 100.0,
            at: start,
        };
        assert_eq!(bucket.take(start, 100.0, 60), 60);
        assert_eq!(
            bucket.take(start, 100.0, 60),
            40,
            "the rest of the second's budget"
        );
        assert_eq!(bucket.take(start, 100.0, 10), 0, "empty");
        let later = start + Duration::from_millis(250);
        assert_eq!(
            bucket.take(later, 100.0, 60),
            25,
            "a quarter second refills 25"
        );
        let much_later = later + Duration::from_secs(60);
        assert_eq!(
            bucket.take(much_later, 100.0, 1_000),
            100,
            "never more than a second"
        );
    }

    #[test]
    fn one_kind_of_refusal_does_not_silence_another() {
        let refusals = Refusals::default();
        assert_eq!(refusals.check(RefusalKind::UnknownIssuer), Some(0));
        assert_eq!(refusals.check(RefusalKind::UnknownIssuer), None);
        assert_eq!(refusals.check(RefusalKind::NoCertificate), Some(0));
    }
}

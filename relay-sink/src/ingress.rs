//! Where batches come in. Each transport turns authenticated agent connections into calls of
//! [`deliver`] (which hands the batch to [`Replay`](crate::replay::Replay)) plus
//! acknowledgements. What the transports share (refusal logging, delivery) lives here, so QUIC
//! and gRPC agents are treated alike.

pub(crate) mod grpc;
pub(crate) mod quic;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::pb;
use runtime::ratelimit::RateLimit;

use rustls::pki_types::CertificateDer;

use crate::Shared;
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
    error: &str,
) {
    shared.metrics.protocol_errors.inc();
    tracing::warn!(%agent, %remote, transport = transport.as_str(), %error, "protocol violation: the agent's stream is ended");
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
    batch: pb::Batch,
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
    metrics
        .sflow
        .observe(batch.datagrams.iter().map(|d| &d.payload[..]));
    let replaying = shared.replay.submit(batch).await;
    shared
        .replayed
        .replaying(agent, ack.session, ack.sequence, &replaying);
    Delivery {
        ack,
        replaying: Some(replaying),
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
    fn one_kind_of_refusal_does_not_silence_another() {
        let refusals = Refusals::default();
        assert_eq!(refusals.check(RefusalKind::UnknownIssuer), Some(0));
        assert_eq!(refusals.check(RefusalKind::UnknownIssuer), None);
        assert_eq!(refusals.check(RefusalKind::NoCertificate), Some(0));
    }
}

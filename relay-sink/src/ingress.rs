//! Where batches come in. Each transport turns authenticated agent connections into calls of
//! [`deliver`] (which hands the batch to [`Replay`](crate::replay::Replay)) plus
//! acknowledgements. What the transports share (refusal logging, delivery) lives here, so QUIC
//! and gRPC agents are treated alike.

pub(crate) mod grpc;
pub(crate) mod quic;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::pb;
use runtime::ratelimit::RateLimit;

use crate::Shared;
use crate::metrics::Metrics;

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

/// Counts and logs (rate-limited per kind) a refused or failed handshake.
pub(crate) fn refused(shared: &Shared, transport: Transport, remote: SocketAddr, reason: &str) {
    Metrics::add(&shared.metrics.handshakes_refused, 1);
    let kind = RefusalKind::of(reason);
    if let Some(more) = shared.refusals.check(kind) {
        tracing::warn!(
            %remote,
            transport = transport.as_str(),
            %reason,
            kind = kind.as_str(),
            earlier_refusals_not_logged = more,
            "agent refused: TLS handshake failed"
        );
    }
}

/// Counts and logs (rate-limited) a handshake that did not complete in time.
pub(crate) fn timed_out(shared: &Shared, transport: Transport, remote: SocketAddr) {
    Metrics::add(&shared.metrics.handshakes_refused, 1);
    if let Some(more) = shared.refusals.check(RefusalKind::Timeout) {
        tracing::warn!(
            %remote,
            transport = transport.as_str(),
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
    Metrics::add(&shared.metrics.protocol_errors, 1);
    tracing::warn!(%agent, %remote, transport = transport.as_str(), %error, "protocol violation: the agent's stream is ended");
}

/// Hands a batch from `agent` to replay and returns its acknowledgement.
pub(crate) fn deliver(shared: &Shared, agent: &str, batch: pb::Batch) -> pb::Ack {
    let ack = pb::Ack {
        session: batch.session,
        sequence: batch.sequence,
    };
    Metrics::add(&shared.metrics.batches_received, 1);
    Metrics::add(
        &shared.metrics.datagrams_received,
        batch.datagrams.len() as u64,
    );
    tracing::trace!(%agent, sequence = ack.sequence, datagrams = batch.datagrams.len(), "batch");
    shared.replay.submit(Arc::new(batch));
    ack
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
    /// Expired or not yet valid.
    Expired,
    /// The handshake did not complete in time.
    Timeout,
    /// Anything else (protocol mismatch, ALPN, garbage).
    Other,
}

impl RefusalKind {
    const ALL: [Self; 7] = [
        Self::NoCertificate,
        Self::UnknownIssuer,
        Self::BadSignature,
        Self::WrongUsage,
        Self::Expired,
        Self::Timeout,
        Self::Other,
    ];

    /// Classifies a handshake error's text (rustls's wording, through quinn).
    pub(crate) fn of(error: &str) -> Self {
        if error.contains("no certificates") {
            Self::NoCertificate
        } else if error.contains("UnknownIssuer") {
            Self::UnknownIssuer
        } else if error.contains("BadSignature") {
            Self::BadSignature
        } else if error.contains("extended key usage") || error.contains("InvalidPurpose") {
            Self::WrongUsage
        } else if error.contains("Expired")
            || error.contains("NotValidYet")
            || error.contains("expired")
        {
            Self::Expired
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
            Self::Timeout => "timeout",
            Self::Other => "other",
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
                "peer doesn't support any known protocol",
                RefusalKind::Other,
            ),
        ];
        for (text, kind) in cases {
            assert_eq!(RefusalKind::of(text), kind, "{text}");
        }
    }

    #[test]
    fn one_kind_of_refusal_does_not_silence_another() {
        let refusals = Refusals::default();
        assert_eq!(refusals.check(RefusalKind::UnknownIssuer), Some(0));
        assert_eq!(refusals.check(RefusalKind::UnknownIssuer), None);
        assert_eq!(refusals.check(RefusalKind::NoCertificate), Some(0));
    }
}

//! The fixed label values the sink's metrics and its security log share: the transport an
//! agent came in on, why a connection was refused, why an agent's stream was ended.
//!
//! Each is a payload-free enum with `as_str` (the label value, stable: dashboards and alerts
//! use it) and `ALL` (every value, so [`Metrics`](crate::metrics::Metrics) can create each
//! series at 0). Deciding *which* value applies is the job of the modules that see the
//! errors ([`refusal`](crate::refusal), [`authz`](crate::authz)); this module imports nothing
//! from the crate.

/// The log target of the lines about agent connections (refusals, violations, limits): the
/// module that wrote them all before they were split by concern, kept so that log filters and
/// routing set up for it still match.
pub(crate) const LOG_TARGET: &str = "relay_sink::ingress";

/// The transport an agent came in on, as a log field and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Quic,
    Grpc,
}

impl Transport {
    pub(crate) const ALL: [Self; 2] = [Self::Quic, Self::Grpc];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Grpc => "grpc",
        }
    }
}

/// Why a connection was refused, in a few stable words: the `kind` field of the security log
/// and the `reason` label of `relay_sink_handshakes_refused_total`.
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

    /// Its place in [`Self::ALL`] (the order of the metric handles).
    pub(crate) fn index(self) -> usize {
        self as usize
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

impl From<certs::refusal::Reason> for RefusalKind {
    fn from(reason: certs::refusal::Reason) -> Self {
        use certs::refusal::Reason;
        match reason {
            Reason::NoCertificate => Self::NoCertificate,
            Reason::UnknownIssuer => Self::UnknownIssuer,
            Reason::BadSignature => Self::BadSignature,
            Reason::WrongUsage => Self::WrongUsage,
            Reason::Expired => Self::Expired,
            Reason::NotYetValid => Self::NotYetValid,
            Reason::Revoked => Self::Revoked,
            Reason::Other => Self::Other,
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric handles are indexed by declaration order; `ALL` must list the same order.
    #[test]
    fn every_list_is_in_declaration_order_with_distinct_labels() {
        for (i, kind) in RefusalKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), i, "{kind:?}");
        }
        for (i, violation) in Violation::ALL.into_iter().enumerate() {
            assert_eq!(violation as usize, i, "{violation:?}");
        }
        let mut labels: Vec<_> = RefusalKind::ALL.map(RefusalKind::as_str).to_vec();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), RefusalKind::ALL.len());
    }
}

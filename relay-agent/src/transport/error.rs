//! Why a connection to a sink failed, or why a session with one ended: [`TransportError`],
//! made where the failure happens (a QUIC handshake, a TLS alert, a gRPC status, a timeout)
//! from the typed error that reports it, and carried to where it is counted and logged. Its
//! [`FailureKind`] picks the `reason` label of `connect_failures`; its text, with advice for
//! the usual certificate mistakes, is what the log says.

use std::fmt;

use crate::config::SinkConfig;
use crate::metrics::ConnectFailure;

/// A source error, kept as it came.
pub(crate) type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The transport a session or attempt used.
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

/// What went wrong, as far as the operator's next step is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The sink refused this agent's certificate or the handshake: a TLS alert from the sink,
    /// a QUIC close during the handshake, the connection closed right after it, or a gRPC
    /// refusal (`PermissionDenied`, `Unauthenticated`).
    RefusedBySink,
    /// The sink's certificate failed this agent's checks.
    UntrustedSink(Untrusted),
    /// No answer in time (UDP blocked, host down, packets dropped).
    Timeout,
    /// Nothing listening, or no route to the sink.
    Unreachable,
    /// The sink ended the session or broke the protocol: a close of its own, a gRPC status,
    /// the end of the call, a TLS failure that is not about certificates.
    Protocol,
    /// Anything else: name resolution, local errors.
    Other,
}

/// Which of this agent's checks the sink's certificate failed; decides the advice given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Untrusted {
    /// Not valid for the name the agent expects (`--server-name`).
    Name,
    /// Not signed by the CA the agent checks against.
    Issuer,
    /// Expired, revoked, wrong purpose and the rest.
    Other,
}

impl FailureKind {
    /// The `reason` label of `relay_agent_connect_failures_total`.
    pub(crate) fn label(self) -> ConnectFailure {
        match self {
            Self::RefusedBySink => ConnectFailure::Refused,
            Self::UntrustedSink(_) => ConnectFailure::UntrustedSink,
            Self::Timeout => ConnectFailure::Timeout,
            Self::Unreachable => ConnectFailure::Unreachable,
            Self::Protocol | Self::Other => ConnectFailure::Other,
        }
    }

    /// The kind of a certificate problem reported by a TLS alert, ours or rustls's: the alert
    /// rustls sends for each certificate error (see rustls's `From<CertificateError> for
    /// AlertDescription`). `None` for alerts that are not about certificates.
    pub(crate) fn of_our_alert(alert: tokio_rustls::rustls::AlertDescription) -> Option<Self> {
        use tokio_rustls::rustls::AlertDescription as A;
        let untrusted = match alert {
            // NotValidForName (and a malformed certificate, which our CA does not issue).
            A::BadCertificate => Untrusted::Name,
            // UnknownIssuer; BadSignature.
            A::UnknownCA | A::DecryptError => Untrusted::Issuer,
            A::CertificateExpired
            | A::CertificateRevoked
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::BadCertificateStatusResponse
            | A::AccessDenied => Untrusted::Other,
            _ => return None,
        };
        Some(Self::UntrustedSink(untrusted))
    }

    /// The kind of a certificate error found by this agent's own checks.
    pub(crate) fn of_certificate_error(error: &tokio_rustls::rustls::CertificateError) -> Self {
        use tokio_rustls::rustls::CertificateError as C;
        Self::UntrustedSink(match error {
            C::NotValidForName | C::NotValidForNameContext { .. } => Untrusted::Name,
            #[allow(deprecated)]
            C::UnknownIssuer | C::BadSignature => Untrusted::Issuer,
            _ => Untrusted::Other,
        })
    }

    /// The kind of a socket error.
    pub(crate) fn of_io(error: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match error.kind() {
            K::TimedOut => Self::Timeout,
            K::ConnectionRefused | K::HostUnreachable | K::NetworkUnreachable => Self::Unreachable,
            _ => Self::Other,
        }
    }
}

/// A connection attempt that failed, or a session that ended: its kind, which sink and
/// transport, what happened in words (advice first, for the usual certificate mistakes), and
/// the typed error behind it.
///
/// The text includes the source's own words, since the log line is where an operator reads
/// them; [`std::error::Error::source`] still gives the typed error to whoever inspects it.
#[derive(Debug, thiserror::Error)]
pub(crate) struct TransportError {
    kind: FailureKind,
    transport: Transport,
    /// The sink's address, as configured.
    sink: String,
    /// What happened, explained.
    what: String,
    #[source]
    source: Option<Source>,
    /// With `auto`, the QUIC attempt that failed before this (gRPC) one.
    quic_first: Option<Box<Self>>,
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.quic_first {
            Some(quic) => write!(f, "QUIC: {quic}; gRPC: {}", self.what),
            None => f.write_str(&self.what),
        }
    }
}

impl TransportError {
    /// A failure of `kind` with `sink` over `transport`, `detail` saying what happened.
    pub(crate) fn new(
        kind: FailureKind,
        transport: Transport,
        sink: &SinkConfig,
        detail: impl fmt::Display,
    ) -> Self {
        Self {
            kind,
            transport,
            sink: sink.addr.clone(),
            what: explain(kind, sink, &detail.to_string()),
            source: None,
            quic_first: None,
        }
    }

    /// The same, with the typed error that reported it.
    pub(crate) fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// This gRPC attempt's failure, following that of the QUIC attempt `quic` (`auto`): the
    /// text gives both, the kind is this one's (the last attempt decides).
    pub(crate) fn after_quic(mut self, quic: Self) -> Self {
        self.quic_first = Some(Box::new(quic));
        self
    }

    pub(crate) fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The sink's address, as configured.
    pub(crate) fn sink(&self) -> &str {
        &self.sink
    }

    /// The transport, or `auto` when this holds both attempts.
    pub(crate) fn transport(&self) -> &'static str {
        match self.quic_first {
            Some(_) => "auto",
            None => self.transport.as_str(),
        }
    }
}

/// What happened, with advice for the usual certificate mistakes. The sink refusing us is
/// told apart from us refusing the sink (our own verification failing).
fn explain(kind: FailureKind, sink: &SinkConfig, detail: &str) -> String {
    match kind {
        FailureKind::RefusedBySink => {
            format!("the sink refused this agent's certificate or the handshake: {detail}")
        }
        FailureKind::UntrustedSink(Untrusted::Name) => format!(
            "the sink's certificate is not valid for the name {:?}: set --server-name to a name in its certificate ({detail})",
            sink.server_name
        ),
        FailureKind::UntrustedSink(Untrusted::Issuer) => format!(
            "the sink's certificate is not signed by the CA in {} ({detail})",
            sink.ca.display()
        ),
        FailureKind::UntrustedSink(Untrusted::Other) => {
            format!("certificate check failed: {detail}")
        }
        FailureKind::Timeout
        | FailureKind::Unreachable
        | FailureKind::Protocol
        | FailureKind::Other => detail.to_owned(),
    }
}

/// The first error of type `E` in `error`'s chain of sources, `error` included.
pub(crate) fn find_in_chain<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(found) = error.downcast_ref::<E>() {
            return Some(found);
        }
        // An io::Error wrapping another error (tokio-rustls wraps rustls's so) shows it as
        // its `get_ref`, which `source` skips.
        if let Some(found) = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<E>())
        {
            return Some(found);
        }
        next = error.source();
    }
    None
}

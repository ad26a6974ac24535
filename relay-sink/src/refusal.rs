//! Connections the sink refuses or ends, and how each is counted and logged: a TLS handshake
//! that fails ([`HandshakeError`]), an agent its authorization refuses (the line
//! [`admission`](crate::admission) asks for), a stream that breaks the protocol
//! ([`ProtocolError`]).
//!
//! Metric labels and the log's `kind` come from the errors' types, never from their text,
//! with one exception that quinn imposes: it keeps of a refusal by our TLS only the alert and
//! rustls's text, and the alert is the same for every certificate refused (see
//! `relay_certs::refusal`), so that text is read back, by `relay_certs`, which writes it.
//!
//! Refusal lines are rate-limited per kind ([`Refusals`]): a flood of bad handshakes must not
//! flood the logs, nor hide a refusal of another kind. Violations are not: they end an
//! authenticated agent's stream, which is rare and always worth knowing.

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Duration;

use proto::compression::CompressionError;
use proto::wire::WireError;
use runtime::ratelimit::RateLimit;
use rustls::AlertDescription;

use crate::Shared;
use crate::labels::{LOG_TARGET, RefusalKind, Transport, Violation};

/// Why a TLS handshake with a would-be agent did not complete.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// A QUIC connection that failed before it was established.
    #[error(transparent)]
    Quic(#[from] quinn::ConnectionError),
    /// A TLS handshake over TCP (gRPC) that failed; when TLS refused it, tokio-rustls's
    /// `io::Error` carries rustls's error.
    #[error(transparent)]
    Tls(#[from] std::io::Error),
    /// Not complete within `--handshake-timeout`.
    #[error("handshake timeout")]
    Timeout,
}

impl HandshakeError {
    /// Why, and the subject of the certificate the client presented, if it presented one that
    /// our TLS refused.
    pub(crate) fn refusal(&self) -> (RefusalKind, Option<&str>) {
        match self {
            Self::Timeout => (RefusalKind::Timeout, None),
            Self::Tls(error) => error
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .map_or((RefusalKind::Other, None), |tls| {
                    of_certs(certs::Refusal::of_error(tls))
                }),
            // Our TLS refused the client: quinn-proto keeps rustls's error as an alert and its
            // text (`TransportError { code: crypto(alert), reason: error.to_string() }`).
            Self::Quic(quinn::ConnectionError::TransportError(error)) => {
                of_certs(certs::Refusal::of_text(&error.reason))
            }
            // The client's TLS gave up (it does not trust our certificate, say): its alert.
            Self::Quic(quinn::ConnectionError::ConnectionClosed(close)) => {
                (of_alert(close.error_code), None)
            }
            Self::Quic(_) => (RefusalKind::Other, None),
        }
    }

    /// What the log line says happened.
    fn message(&self) -> &'static str {
        match self {
            Self::Timeout => "agent refused: TLS handshake did not complete in time",
            Self::Quic(_) | Self::Tls(_) => "agent refused: TLS handshake failed",
        }
    }
}

fn of_certs(refusal: certs::Refusal<'_>) -> (RefusalKind, Option<&str>) {
    (refusal.reason.into(), refusal.presented_subject)
}

/// The kind of a QUIC close whose code carries a TLS alert (as QUIC's crypto errors do).
fn of_alert(code: quinn::TransportErrorCode) -> RefusalKind {
    let code = u64::from(code);
    if !(0x100..0x200).contains(&code) {
        return RefusalKind::Other;
    }
    match AlertDescription::from((code & 0xff) as u8) {
        AlertDescription::CertificateRequired => RefusalKind::NoCertificate,
        AlertDescription::UnknownCA => RefusalKind::UnknownIssuer,
        AlertDescription::DecryptError => RefusalKind::BadSignature,
        AlertDescription::UnsupportedCertificate => RefusalKind::WrongUsage,
        AlertDescription::CertificateExpired => RefusalKind::Expired,
        AlertDescription::CertificateRevoked => RefusalKind::Revoked,
        _ => RefusalKind::Other,
    }
}

/// Why an authenticated agent's stream was ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProtocolError {
    /// A frame still incomplete `--frame-timeout` after it began.
    #[error("frame incomplete for --frame-timeout ({buffered} bytes of it arrived)")]
    FrameTimeout {
        /// Bytes of the frame that had arrived.
        buffered: usize,
    },
    /// A frame over the limit, cut short, or that does not decode.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A compressed batch that does not expand.
    #[error(transparent)]
    Compression(#[from] CompressionError),
    /// A gRPC message over the limit or that does not decode, as tonic reports it.
    #[error("{}", .status.message())]
    Grpc {
        /// Which.
        kind: Violation,
        /// tonic's report, sent back to the agent.
        status: tonic::Status,
    },
}

impl ProtocolError {
    /// The `reason` label it is counted under.
    pub(crate) fn kind(&self) -> Violation {
        match self {
            Self::FrameTimeout { .. } => Violation::FrameTimeout,
            Self::Wire(WireError::FrameTooLarge { .. }) => Violation::FrameTooLarge,
            Self::Wire(WireError::TruncatedFrame { .. }) => Violation::Truncated,
            Self::Wire(WireError::Malformed(_) | WireError::Io(_)) => Violation::Malformed,
            Self::Compression(CompressionError::TooLarge { .. }) => Violation::DecompressedTooLarge,
            Self::Compression(_) => Violation::Compression,
            Self::Grpc { kind, .. } => *kind,
        }
    }

    /// A failed gRPC read that is the agent's fault (a message over the size limit, or one
    /// that does not decode); `Err` with the status when it is not (the network, a reset).
    ///
    /// tonic reports a message that does not decode only as `Status::internal` with prost's
    /// text, and `Internal` alone would take in transport failures: the text decides there.
    pub(crate) fn of_status(status: tonic::Status) -> Result<Self, tonic::Status> {
        use tonic::Code;
        let kind = match status.code() {
            Code::OutOfRange | Code::ResourceExhausted => Violation::FrameTooLarge,
            Code::Internal if status.message().contains("decode") => Violation::Malformed,
            _ => return Err(status),
        };
        Ok(Self::Grpc { kind, status })
    }
}

/// At most ten log lines a second per kind of refusal.
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
        self.limits[kind.index()].check()
    }
}

/// One refused connection, as the security log tells it.
pub(crate) struct Refused<'a> {
    pub(crate) transport: Transport,
    pub(crate) remote: SocketAddr,
    pub(crate) kind: RefusalKind,
    /// The agent's name, which the CA vouches for (an authenticated agent only).
    pub(crate) agent: Option<&'a str>,
    /// The subject of the certificate it presented: a claim when the certificate was refused.
    pub(crate) presented_subject: Option<&'a str>,
    pub(crate) reason: &'a dyn Display,
    pub(crate) message: &'static str,
}

/// Counts a failed handshake and logs it (rate-limited per kind).
pub(crate) fn handshake_failed(
    shared: &Shared,
    transport: Transport,
    remote: SocketAddr,
    error: &HandshakeError,
) {
    let (kind, presented_subject) = error.refusal();
    refused(
        shared,
        &Refused {
            transport,
            remote,
            kind,
            agent: None,
            presented_subject,
            reason: error,
            message: error.message(),
        },
    );
}

/// Counts a refused connection and logs it: one WARN line with `security_event`, the peer, the
/// kind, the subject of the certificate it presented and the reason, at most ten a second per
/// kind of refusal, each saying how many were held back before it.
pub(crate) fn refused(shared: &Shared, line: &Refused<'_>) {
    shared.metrics.refused(line.kind).inc();
    if let Some(more) = shared.refusals.check(line.kind) {
        tracing::warn!(
            target: LOG_TARGET,
            security_event = "tls_handshake_refused",
            remote = %line.remote,
            transport = line.transport.as_str(),
            kind = line.kind.as_str(),
            agent = line.agent,
            presented_subject = line.presented_subject.unwrap_or("-"),
            reason = %line.reason,
            earlier_refusals_not_logged = more,
            "{}",
            line.message
        );
    }
}

/// Counts a protocol violation and logs it (not rate-limited).
pub(crate) fn violation(
    shared: &Shared,
    transport: Transport,
    agent: &str,
    remote: SocketAddr,
    error: &ProtocolError,
) {
    let kind = error.kind();
    shared.metrics.protocol_error(kind).inc();
    tracing::warn!(target: LOG_TARGET, %agent, %remote, transport = transport.as_str(), reason = kind.as_str(), %error, "protocol violation: the agent's stream is ended");
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Arc;

    use rustls::{CertificateError, OtherError};

    use super::*;

    fn tls(error: rustls::Error) -> HandshakeError {
        HandshakeError::Tls(io::Error::new(io::ErrorKind::InvalidData, error))
    }

    fn kind(error: &HandshakeError) -> RefusalKind {
        error.refusal().0
    }

    #[test]
    fn no_certificate() {
        assert_eq!(
            kind(&tls(rustls::Error::NoCertificatesPresented)),
            RefusalKind::NoCertificate
        );
    }

    #[test]
    fn unknown_issuer() {
        let error = tls(CertificateError::UnknownIssuer.into());
        assert_eq!(kind(&error), RefusalKind::UnknownIssuer);
    }

    #[test]
    fn bad_signature() {
        let error = tls(CertificateError::BadSignature.into());
        assert_eq!(kind(&error), RefusalKind::BadSignature);
    }

    #[test]
    fn wrong_usage() {
        let error = tls(CertificateError::InvalidPurpose.into());
        assert_eq!(kind(&error), RefusalKind::WrongUsage);
    }

    #[test]
    fn expired() {
        let error = tls(CertificateError::Expired.into());
        assert_eq!(kind(&error), RefusalKind::Expired);
    }

    #[test]
    fn not_yet_valid() {
        let error = tls(CertificateError::NotValidYet.into());
        assert_eq!(kind(&error), RefusalKind::NotYetValid);
    }

    #[test]
    fn revoked() {
        let error = tls(CertificateError::Revoked.into());
        assert_eq!(kind(&error), RefusalKind::Revoked);
    }

    /// A certificate from another CA, refused by the sink's own TLS configuration (in memory):
    /// the kind and the presented subject come out of rustls's error by type.
    #[test]
    fn a_refused_certificate_is_read_by_type_with_its_subject() {
        use certs::{Ca, Identity, Leaf, Role, TrustAnchors};
        let ours = Ca::generate("relay CA", 1).unwrap();
        let theirs = Ca::generate("other CA", 1).unwrap();
        let anchors = TrustAnchors::from_pem(ours.cert_pem(), "ca.pem").unwrap();
        let identity = |ca: &Ca, role, name: &str| {
            let issued = ca.issue(&Leaf::new(role, name, 1)).unwrap();
            Identity::from_pem(&issued.cert_pem, &issued.key_pem, "crt", "key").unwrap()
        };
        let sink = identity(&ours, Role::Sink, "sink");
        let sink = certs::server_config(&anchors, &sink, &[b"t"]).unwrap();
        let intruder = identity(&theirs, Role::Agent, "intruder");
        let agent = certs::client_config(&anchors, &intruder, &[b"t"]).unwrap();
        let name = rustls::pki_types::ServerName::try_from("sink").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(agent), name).unwrap();
        let mut server = rustls::ServerConnection::new(Arc::new(sink)).unwrap();
        let mut refused = None;
        for _ in 0..10 {
            let mut flight = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut flight).unwrap();
            }
            if !flight.is_empty() {
                server.read_tls(&mut &flight[..]).unwrap();
                if let Err(error) = server.process_new_packets() {
                    refused = Some(error);
                    break;
                }
            }
            flight.clear();
            while server.wants_write() {
                server.write_tls(&mut flight).unwrap();
            }
            if !flight.is_empty() {
                client.read_tls(&mut &flight[..]).unwrap();
                client.process_new_packets().unwrap();
            }
        }
        let error = tls(refused.expect("the sink refuses a certificate of another CA"));
        assert_eq!(
            error.refusal(),
            (RefusalKind::UnknownIssuer, Some("CN=intruder"))
        );
    }

    #[test]
    fn timeout() {
        assert_eq!(kind(&HandshakeError::Timeout), RefusalKind::Timeout);
        assert_eq!(HandshakeError::Timeout.to_string(), "handshake timeout");
    }

    #[test]
    fn other() {
        let cases = [
            tls(rustls::Error::NoApplicationProtocol),
            tls(CertificateError::BadEncoding.into()),
            // An `Other` that is not the verifier's annotation.
            tls(CertificateError::Other(OtherError(Arc::new(io::Error::other("x")))).into()),
            HandshakeError::Tls(io::Error::from(io::ErrorKind::ConnectionReset)),
            HandshakeError::Quic(quinn::ConnectionError::TimedOut),
        ];
        for error in cases {
            assert_eq!(kind(&error), RefusalKind::Other, "{error}");
        }
    }

    /// The client's TLS closed the connection: its alert says why, and the text it sent along
    /// (its own to choose) is not read.
    #[test]
    fn a_client_refusing_us_is_classified_by_its_alert() {
        let closed = |alert: AlertDescription, reason: &'static [u8]| {
            HandshakeError::Quic(quinn::ConnectionError::ConnectionClosed(
                quinn::ConnectionClose {
                    error_code: quinn::TransportErrorCode::crypto(alert.into()),
                    frame_type: None,
                    reason: bytes::Bytes::from_static(reason),
                },
            ))
        };
        let error = closed(AlertDescription::UnknownCA, b"presented subject \"CN=x\"");
        assert_eq!(error.refusal(), (RefusalKind::UnknownIssuer, None));
        assert_eq!(
            kind(&closed(AlertDescription::HandshakeFailure, b"Revoked")),
            RefusalKind::Other
        );
    }

    #[test]
    fn one_kind_of_refusal_does_not_silence_another() {
        let refusals = Refusals::default();
        assert_eq!(refusals.check(RefusalKind::UnknownIssuer), Some(0));
        assert_eq!(refusals.check(RefusalKind::UnknownIssuer), None);
        assert_eq!(refusals.check(RefusalKind::NoCertificate), Some(0));
    }

    #[test]
    fn violations_are_counted_by_their_error_kind() {
        let timeout = ProtocolError::FrameTimeout { buffered: 3 };
        assert_eq!(timeout.kind(), Violation::FrameTimeout);
        assert_eq!(
            timeout.to_string(),
            "frame incomplete for --frame-timeout (3 bytes of it arrived)"
        );
        let wire = [
            (
                WireError::FrameTooLarge { len: 9, max: 8 },
                Violation::FrameTooLarge,
            ),
            (
                WireError::TruncatedFrame { buffered: 1 },
                Violation::Truncated,
            ),
            (
                WireError::Io(io::ErrorKind::Other.into()),
                Violation::Malformed,
            ),
        ];
        for (error, kind) in wire {
            assert_eq!(ProtocolError::from(error).kind(), kind);
        }
        let too_large = CompressionError::TooLarge { len: 9, max: 8 };
        assert_eq!(
            ProtocolError::from(too_large).kind(),
            Violation::DecompressedTooLarge
        );
        assert_eq!(
            ProtocolError::from(CompressionError::UnknownSize).kind(),
            Violation::Compression
        );
        let large = ProtocolError::of_status(tonic::Status::out_of_range("too big")).unwrap();
        assert_eq!(large.kind(), Violation::FrameTooLarge);
        assert_eq!(large.to_string(), "too big");
        let garbage = tonic::Status::internal("failed to decode Protobuf message: x");
        assert_eq!(
            ProtocolError::of_status(garbage).unwrap().kind(),
            Violation::Malformed
        );
        let eof = tonic::Status::internal("Unexpected EOF decoding stream.");
        assert!(
            ProtocolError::of_status(eof).is_err(),
            "the network's fault"
        );
    }
}

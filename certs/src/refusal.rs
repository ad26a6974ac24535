//! The subject of a refused client certificate, carried in the refusal's text; and why it was
//! refused, as a kind ([`Refusal`]).
//!
//! When the sink refuses an agent's certificate, its security log should say whom it refused
//! (`CN=evil-agent`), not only why. The refusal reaches the sink's accept loop only as text:
//! quinn turns it into a `TransportError` reason, tokio-rustls into an `io::Error`. So the
//! sink's verifier (webpki, built in [`load`](crate::load)) is wrapped: a refusal keeps webpki's
//! reason text and gains the subject of the presented end-entity certificate in a marked form,
//! which [`presented_subject`] reads back. The format and its parser live here, together.
//!
//! # Format
//!
//! The refused handshake's error reads (rustls `Error` → `Display`):
//!
//! ```text
//! invalid peer certificate: Other(OtherError(UnknownIssuer; presented subject "CN=evil-agent"))
//! ```
//!
//! that is, webpki's reason as rustls words it today (`UnknownIssuer`, `BadSignature`,
//! `certificate expired: …`, `certificate does not allow extended key usage for …`), then
//! `; presented subject "…"` with the subject distinguished name as x509-parser writes it.
//! The subject never contains `"`, control characters or bidirectional-text controls (each is
//! replaced), and is cut at 256 characters (`...` marks the cut): it is chosen by whoever
//! connects, and it goes into log lines.
//!
//! # TLS alert
//!
//! rustls picks the alert it sends from the error variant, and no variant that carries text
//! keeps the specific alert. An annotated refusal is sent as `certificate_unknown` (46) instead
//! of `unknown_ca` (48), `decrypt_error` (51), `certificate_expired` (45) or
//! `unsupported_certificate` (43). The agent still learns it was refused (and over QUIC reads
//! the reason text itself); the sink, which decides, logs the precise reason.
//!
//! # Reading a refusal back
//!
//! [`Refusal::of_error`] reads the reason and the subject from rustls's error, by type (the
//! annotation is a typed [`OtherError`] that it unwraps): tokio-rustls hands the sink that
//! error inside its `io::Error`. quinn does not: quinn-proto turns it into a
//! `TransportError { code: <the alert>, reason: error.to_string() }`, and the annotation makes
//! the alert `certificate_unknown` for every reason. For a QUIC handshake the text is all that
//! is left, and [`Refusal::of_text`] reads it, here beside the format it reads; a test checks
//! that both readings agree on every refusal the verifier makes.
//!
//! What this deliberately does not do: decide anything. Every verifier method delegates to
//! webpki; only the text of a refused certificate changes. A certificate that does not parse as
//! X.509 is refused with webpki's error unchanged (no subject to tell).

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use rustls::{Error, SignatureScheme};
use x509_parser::prelude::{FromDer, X509Certificate};

/// What precedes the quoted subject in a refusal's text.
const MARKER: &str = "; presented subject \"";

/// Longest subject written, in characters.
const MAX_SUBJECT_CHARS: usize = 256;

/// The subject of the certificate a refused client presented, from the text of the handshake
/// error (however wrapped: quinn's `the cryptographic handshake failed: error 46: …`, an
/// `io::Error`, a gRPC status).
///
/// `None` when the text carries no subject: the refusal was not about a presented certificate
/// (none was sent, a timeout, a protocol error), or the certificate did not parse.
///
/// The subject is what the peer *claims*: its certificate was refused, so nothing vouches for
/// it. Log it as the presented subject, never as the agent's identity.
pub fn presented_subject(error_text: &str) -> Option<&str> {
    let start = error_text.rfind(MARKER)? + MARKER.len();
    let rest = &error_text[start..];
    rest.find('"').map(|end| &rest[..end])
}

/// Why a client's certificate (or the lack of one) was refused: the kinds the sink counts and
/// logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The client sent no certificate.
    NoCertificate,
    /// Not issued by a CA we trust.
    UnknownIssuer,
    /// A signature that does not verify (often another CA with the same name as ours).
    BadSignature,
    /// Not a certificate for client authentication (a sink's, say).
    WrongUsage,
    /// Past its validity period (or the CRL checked against is).
    Expired,
    /// Before its validity period.
    NotYetValid,
    /// Listed in a CRL.
    Revoked,
    /// Anything else: a certificate that does not parse, a protocol error, garbage.
    Other,
}

/// A refused handshake as the verifier saw it: why, and the subject the client presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal<'a> {
    /// Why.
    pub reason: Reason,
    /// The subject of the refused certificate, when there was one that parsed. A claim: see
    /// [`presented_subject`].
    pub presented_subject: Option<&'a str>,
}

impl<'a> Refusal<'a> {
    /// Reads a handshake error, by type.
    pub fn of_error(error: &'a Error) -> Self {
        let reason = match error {
            Error::NoCertificatesPresented => Reason::NoCertificate,
            Error::InvalidCertificate(e) => Reason::of_certificate(e),
            _ => Reason::Other,
        };
        let presented_subject = match error {
            Error::InvalidCertificate(CertificateError::Other(other)) => {
                Refused::of(other).map(|r| r.subject.as_str())
            }
            _ => None,
        };
        Self {
            reason,
            presented_subject,
        }
    }

    /// Reads the text of a handshake error (rustls's `Display`, however wrapped), where the
    /// error itself did not survive (QUIC; see the module's docs). Only the text before the
    /// presented subject is read for the reason: the subject is the client's to choose.
    pub fn of_text(text: &'a str) -> Self {
        let reason = text.find(MARKER).map_or(text, |end| &text[..end]);
        let reason = if reason.contains("no certificates") {
            Reason::NoCertificate
        } else if reason.contains("UnknownIssuer") {
            Reason::UnknownIssuer
        } else if reason.contains("BadSignature") {
            Reason::BadSignature
        } else if reason.contains("extended key usage") || reason.contains("InvalidPurpose") {
            Reason::WrongUsage
        } else if reason.contains("NotValidYet") || reason.contains("not valid yet") {
            Reason::NotYetValid
        } else if reason.contains("Expired") || reason.contains("expired") {
            Reason::Expired
        } else if reason.contains("Revoked") {
            Reason::Revoked
        } else {
            Reason::Other
        };
        Self {
            reason,
            presented_subject: presented_subject(text),
        }
    }
}

impl Reason {
    fn of_certificate(error: &CertificateError) -> Self {
        use CertificateError as E;
        match error {
            E::UnknownIssuer => Self::UnknownIssuer,
            E::BadSignature => Self::BadSignature,
            E::InvalidPurpose | E::InvalidPurposeContext { .. } => Self::WrongUsage,
            // An expired CRL refuses every client: counted as expired, as the sink always has.
            E::Expired
            | E::ExpiredContext { .. }
            | E::ExpiredRevocationList
            | E::ExpiredRevocationListContext { .. } => Self::Expired,
            E::NotValidYet | E::NotValidYetContext { .. } => Self::NotYetValid,
            E::Revoked => Self::Revoked,
            E::Other(other) => {
                Refused::of(other).map_or(Self::Other, |r| Self::of_certificate(&r.reason))
            }
            _ => Self::Other,
        }
    }
}

/// Wraps the sink's client-certificate verifier so that a refusal names the presented subject.
pub(crate) fn annotate(inner: Arc<dyn ClientCertVerifier>) -> Arc<dyn ClientCertVerifier> {
    Arc::new(SubjectOnRefusal { inner })
}

/// A client-certificate verifier that delegates every decision to `inner` and adds the
/// presented subject to the text of a refused certificate.
#[derive(Debug)]
struct SubjectOnRefusal {
    inner: Arc<dyn ClientCertVerifier>,
}

/// A refused certificate: the verifier's reason and the subject it presented.
struct Refused {
    reason: CertificateError,
    subject: String,
}

// === impl SubjectOnRefusal ===

impl ClientCertVerifier for SubjectOnRefusal {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|error| with_subject(error, end_entity))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// Adds the subject of `end_entity` to a certificate refusal. Other errors, and certificates
/// that do not parse, are returned unchanged.
fn with_subject(error: Error, end_entity: &[u8]) -> Error {
    let Error::InvalidCertificate(reason) = error else {
        return error;
    };
    match subject_of(end_entity) {
        Some(subject) => {
            Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused {
                reason,
                subject,
            }))))
        }
        None => Error::InvalidCertificate(reason),
    }
}

/// The subject distinguished name, made safe to quote in a log line.
fn subject_of(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let subject = cert.subject().to_string();
    let mut safe = String::with_capacity(subject.len().min(MAX_SUBJECT_CHARS) + 3);
    for (i, c) in subject.chars().enumerate() {
        if i == MAX_SUBJECT_CHARS {
            safe.push_str("...");
            break;
        }
        safe.push(match c {
            '"' => '\'',
            c if c.is_control() || is_bidi_control(c) => '?',
            c => c,
        });
    }
    Some(safe)
}

/// Characters that reorder the text around them on a terminal ("Trojan Source").
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

// === impl Refused ===

impl Refused {
    /// The annotation inside a certificate error's `Other`, if it is ours.
    fn of(other: &OtherError) -> Option<&Self> {
        other.0.downcast_ref::<Self>()
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{MARKER}{}\"", self.reason, self.subject)
    }
}

/// The same as `Display`: rustls writes a `CertificateError::Other` with `{:?}`, and this text is
/// what the sink logs and classifies.
impl fmt::Debug for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Refused {}

#[cfg(test)]
mod tests {
    use rustls::pki_types::ServerName;
    use rustls::{AlertDescription, ClientConnection, ServerConnection};

    use super::*;
    use crate::{Ca, Identity, Leaf, Role, TrustAnchors, client_config, load, server_config};

    fn der(pem: &str) -> CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn anchors(ca: &Ca) -> TrustAnchors {
        TrustAnchors::from_pem(ca.cert_pem(), "ca.crt").unwrap()
    }

    fn identity(ca: &Ca, role: Role, name: &str) -> Identity {
        let issued = ca.issue(&Leaf::new(role, name, 1)).unwrap();
        Identity::from_pem(&issued.cert_pem, &issued.key_pem, "crt", "key").unwrap()
    }

    #[test]
    fn a_refusal_names_the_presented_subject_and_keeps_its_reason() {
        let ours = Ca::generate("relay CA A", 1).unwrap();
        let theirs = Ca::generate("relay CA B", 1).unwrap();
        let verifier = load::client_verifier(&anchors(&ours), &crate::Revocation::none()).unwrap();
        let evil = theirs
            .issue(&Leaf::new(Role::Agent, "evil-agent", 1))
            .unwrap();

        let error = verifier
            .verify_client_cert(&der(&evil.cert_pem), &[], UnixTime::now())
            .unwrap_err();
        let text = error.to_string();
        assert_eq!(
            text,
            "invalid peer certificate: Other(OtherError(UnknownIssuer; presented subject \"CN=evil-agent\"))"
        );
        assert_eq!(presented_subject(&text), Some("CN=evil-agent"));
        // As quinn wraps it.
        let quic = format!("the cryptographic handshake failed: error 46: {text}");
        assert!(quic.contains("UnknownIssuer"));
        assert_eq!(presented_subject(&quic), Some("CN=evil-agent"));

        let good = ours.issue(&Leaf::new(Role::Agent, "site-a", 1)).unwrap();
        verifier
            .verify_client_cert(&der(&good.cert_pem), &[], UnixTime::now())
            .unwrap();
    }

    #[test]
    fn reasons_the_sink_classifies_by_survive() {
        let ca = Ca::generate("relay CA", 1).unwrap();
        let verifier = load::client_verifier(&anchors(&ca), &crate::Revocation::none()).unwrap();
        let refuse = |leaf: Leaf| {
            let issued = ca.issue(&leaf).unwrap();
            verifier
                .verify_client_cert(&der(&issued.cert_pem), &[], UnixTime::now())
                .unwrap_err()
                .to_string()
        };

        let sink_cert = refuse(Leaf::new(Role::Sink, "a-sink", 1));
        assert!(sink_cert.contains("extended key usage"), "{sink_cert}");
        assert_eq!(presented_subject(&sink_cert), Some("CN=a-sink"));

        let mut old = Leaf::new(Role::Agent, "old-agent", 1);
        old.not_before -= time::Duration::days(10);
        old.not_after = old.not_before + time::Duration::days(1);
        let expired = refuse(old);
        assert!(expired.contains("expired"), "{expired}");
        assert_eq!(presented_subject(&expired), Some("CN=old-agent"));
    }

    #[test]
    fn garbage_is_refused_as_before_without_a_subject() {
        let ca = Ca::generate("relay CA", 1).unwrap();
        let verifier = load::client_verifier(&anchors(&ca), &crate::Revocation::none()).unwrap();
        for bytes in [&b""[..], b"\x30\x03\x02\x01", b"not a certificate at all"] {
            let error = verifier
                .verify_client_cert(&CertificateDer::from(bytes), &[], UnixTime::now())
                .unwrap_err();
            assert_eq!(
                error,
                Error::InvalidCertificate(CertificateError::BadEncoding)
            );
            assert_eq!(presented_subject(&error.to_string()), None);
        }
    }

    #[test]
    fn hostile_subjects_are_made_safe() {
        let ca = Ca::generate("relay CA", 1).unwrap();
        let name = format!("a\"b\nc\u{202e}d{}", "x".repeat(400));
        let issued = ca.issue(&Leaf::new(Role::Agent, name, 1)).unwrap();
        let subject = subject_of(&der(&issued.cert_pem)).unwrap();
        assert!(subject.starts_with("CN=a'b?c?dxxx"), "{subject}");
        assert!(subject.ends_with("..."));
        assert_eq!(subject.chars().count(), MAX_SUBJECT_CHARS + 3);
        let text = with_subject(
            Error::InvalidCertificate(CertificateError::UnknownIssuer),
            &der(&issued.cert_pem),
        )
        .to_string();
        assert_eq!(presented_subject(&text), Some(subject.as_str()));
    }

    #[test]
    fn texts_without_a_subject() {
        assert_eq!(presented_subject("peer sent no certificates"), None);
        assert_eq!(presented_subject("handshake timeout"), None);
        // Cut off before the closing quote (a truncated close reason): nothing half-read.
        assert_eq!(presented_subject("x; presented subject \"CN=ev"), None);
        assert_eq!(presented_subject("x; presented subject \"\""), Some(""));
    }

    /// Every kind of refusal the verifier makes, read by type and read from its text (as
    /// quinn wraps it): the same kind and subject either way.
    #[test]
    fn each_reason_is_read_alike_from_the_error_and_from_its_text() {
        let ca = Ca::generate("relay CA", 1).unwrap();
        let foreign = Ca::generate("relay CA B", 1).unwrap();
        let namesake = Ca::generate("relay CA", 1).unwrap();
        let revoked = ca.issue(&Leaf::new(Role::Agent, "retired", 1)).unwrap();
        let crl = ca
            .revoke(
                None,
                &crate::revocation::serial_of(&revoked.cert_pem).unwrap(),
                30,
            )
            .unwrap();
        let revocation =
            crate::Revocation::from_pem(crl.pem.as_bytes(), ca.cert_pem().as_bytes(), "crl.pem")
                .unwrap();
        let verifier = load::client_verifier(&anchors(&ca), &revocation).unwrap();
        let refuse = |der: CertificateDer<'_>| {
            verifier
                .verify_client_cert(&der, &[], UnixTime::now())
                .unwrap_err()
        };
        let leaf = |ca: &Ca, leaf: Leaf| der(&ca.issue(&leaf).unwrap().cert_pem);
        let mut expired = Leaf::new(Role::Agent, "old", 1);
        expired.not_before -= time::Duration::days(10);
        expired.not_after = expired.not_before + time::Duration::days(1);
        let mut early = Leaf::new(Role::Agent, "early", 1);
        early.not_before += time::Duration::days(10);
        early.not_after = early.not_before + time::Duration::days(1);

        let cases = [
            (Error::NoCertificatesPresented, Reason::NoCertificate, None),
            (
                refuse(leaf(&foreign, Leaf::new(Role::Agent, "evil", 1))),
                Reason::UnknownIssuer,
                Some("CN=evil"),
            ),
            (
                refuse(leaf(&namesake, Leaf::new(Role::Agent, "twin", 1))),
                Reason::BadSignature,
                Some("CN=twin"),
            ),
            (
                refuse(leaf(&ca, Leaf::new(Role::Sink, "a-sink", 1))),
                Reason::WrongUsage,
                Some("CN=a-sink"),
            ),
            (refuse(leaf(&ca, expired)), Reason::Expired, Some("CN=old")),
            (
                refuse(leaf(&ca, early)),
                Reason::NotYetValid,
                Some("CN=early"),
            ),
            (
                refuse(der(&revoked.cert_pem)),
                Reason::Revoked,
                Some("CN=retired"),
            ),
            (
                refuse(CertificateDer::from(&b"garbage"[..])),
                Reason::Other,
                None,
            ),
        ];
        for (error, reason, subject) in cases {
            let typed = Refusal::of_error(&error);
            assert_eq!(typed.reason, reason, "{error}");
            assert_eq!(typed.presented_subject, subject, "{error}");
            let quic = format!("the cryptographic handshake failed: error 46: {error}");
            assert_eq!(Refusal::of_text(&quic), typed, "{quic}");
        }
    }

    #[test]
    fn a_subject_cannot_choose_the_reason_read_from_text() {
        let text = "invalid peer certificate: Other(OtherError(UnknownIssuer; presented subject \"CN=Revoked expired\"))";
        let refusal = Refusal::of_text(text);
        assert_eq!(refusal.reason, Reason::UnknownIssuer);
        assert_eq!(refusal.presented_subject, Some("CN=Revoked expired"));
        assert_eq!(
            Refusal::of_text("peer doesn't support any known protocol").reason,
            Reason::Other
        );
    }

    /// The whole handshake in memory, as the sink's accept loop sees it.
    #[test]
    fn a_foreign_agent_is_refused_with_its_subject_in_the_handshake_error() {
        let ours = Ca::generate("relay CA A", 1).unwrap();
        let theirs = Ca::generate("relay CA B", 1).unwrap();
        let sink = server_config(
            &anchors(&ours),
            &identity(&ours, Role::Sink, "sink"),
            &[b"test"],
        )
        .unwrap();
        let handshake = |agent: &Identity| {
            let agent = client_config(&anchors(&ours), agent, &[b"test"]).unwrap();
            let mut client = ClientConnection::new(
                Arc::new(agent),
                ServerName::try_from("sink").unwrap().to_owned(),
            )
            .unwrap();
            let mut server = ServerConnection::new(Arc::new(sink.clone())).unwrap();
            handshake(&mut client, &mut server)
        };

        let (server, client) = handshake(&identity(&theirs, Role::Agent, "evil-agent"));
        let server = server.unwrap_err().to_string();
        assert!(server.contains("UnknownIssuer"), "{server}");
        assert_eq!(presented_subject(&server), Some("CN=evil-agent"));
        assert_eq!(
            client.unwrap_err(),
            Error::AlertReceived(AlertDescription::CertificateUnknown)
        );

        let (server, client) = handshake(&identity(&ours, Role::Agent, "site-a"));
        server.unwrap();
        client.unwrap();
    }

    /// Runs a handshake to the end; the server's and the client's outcome.
    fn handshake(
        client: &mut ClientConnection,
        server: &mut ServerConnection,
    ) -> (Result<(), Error>, Result<(), Error>) {
        let (mut server_result, mut client_result) = (Ok(()), Ok(()));
        for _ in 0..10 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() && server_result.is_ok() {
                server.read_tls(&mut &buf[..]).unwrap();
                server_result = server.process_new_packets().map(drop);
            }
            buf.clear();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() && client_result.is_ok() {
                client.read_tls(&mut &buf[..]).unwrap();
                client_result = client.process_new_packets().map(drop);
            }
            let done = !client.is_handshaking() && !server.is_handshaking();
            if done || server_result.is_err() || client_result.is_err() {
                break;
            }
        }
        // A refusing server sends its alert after the error; let the client read it.
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() && client_result.is_ok() {
            client.read_tls(&mut &buf[..]).unwrap();
            client_result = client.process_new_packets().map(drop);
        }
        (server_result, client_result)
    }
}

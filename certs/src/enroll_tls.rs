//! The TLS of the enrollment port (`relay-sink --enroll-listen`), both ends.
//!
//! - The sink serves its own certificate chain with the root CA certificate appended, so that
//!   an agent holding nothing but a token (which names the root by its SHA-256 fingerprint)
//!   can check whom it talks to. Client certificates are asked for but optional: enrolling
//!   needs none (the token is the credential), renewing needs the agent's current one, checked
//!   against the CA file (and, by the renewal call, against the revocation list).
//! - The agent that enrolls trusts exactly one root: the certificate in the sink's chain whose
//!   fingerprint is the token's. The rest of the chain and the server name are then verified
//!   by webpki as on the relay port. Nothing is sent before that check passes.
//!
//! TLS 1.3 only, no early data, ALPN `h2` (gRPC), as on the relay's gRPC port.

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;

use crate::load::provider;
use crate::token::{fingerprint, fingerprint_display};
use crate::{Error, Identity, TrustAnchors};

/// ALPN of the enrollment port: gRPC's HTTP/2.
const H2: &[u8] = b"h2";

/// The sink's configuration for the enrollment port: `identity`'s chain with `root` appended
/// (unless already its last), client certificates optional and, when presented, verified
/// against `ca`.
///
/// Revocation is not checked here but by the renewal call, against the revocation list in
/// force, so that a revoked agent gets a refusal that says so (and a security event) rather
/// than a failed handshake.
///
/// # Errors
///
/// When the identity's key does not fit its certificate, or the CA set is unusable.
pub fn enrollment_server_config(
    ca: &TrustAnchors,
    root: &CertificateDer<'static>,
    identity: &Identity,
) -> Result<rustls::ServerConfig, Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(ca.roots(), provider())
        .allow_unauthenticated()
        .build()?;
    let mut chain = identity.chain().to_vec();
    if chain.last() != Some(root) {
        chain.push(root.clone());
    }
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, identity.key().clone_key())?;
    config.alpn_protocols = vec![H2.to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// The configuration of an agent that enrolls: it trusts only the root whose fingerprint is
/// `root_fingerprint`, found in the chain the sink presents, and presents no certificate.
///
/// # Errors
///
/// When rustls refuses the protocol versions (never, with the built-in provider).
pub fn pinned_client_config(root_fingerprint: [u8; 32]) -> Result<rustls::ClientConfig, Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedRoot {
            fingerprint: root_fingerprint,
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![H2.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

/// The configuration of an agent that renews: the sink verified against `ca`, `identity` (the
/// current certificate) presented, ALPN `h2`.
///
/// # Errors
///
/// When the identity's key does not match its certificate.
pub fn renewal_client_config(
    ca: &TrustAnchors,
    identity: &Identity,
) -> Result<rustls::ClientConfig, Error> {
    crate::client_config(ca, identity, &[H2])
}

/// Trusts the one root of the chain whose fingerprint is the token's; webpki does the rest.
#[derive(Debug)]
struct PinnedRoot {
    fingerprint: [u8; 32],
}

impl ServerCertVerifier for PinnedRoot {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let root = intermediates
            .iter()
            .find(|cert| fingerprint(cert) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the sink's certificate chain does not hold the root CA the token names \
                     ({}): this is not the sink the token was made for",
                    fingerprint_display(&self.fingerprint)
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(root.clone().into_owned())?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|cert| *cert != root)
            .cloned()
            .collect();
        webpki.verify_server_cert(end_entity, &others, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::handshake;
    use crate::{Ca, Leaf, Role};
    use rustls::pki_types::pem::PemObject;

    struct Pki {
        root: Ca,
        anchors: TrustAnchors,
        sink: Identity,
    }

    fn pki() -> Pki {
        let root = Ca::generate("enroll test root", 30).unwrap();
        let anchors = TrustAnchors::from_pem(root.cert_pem(), "ca.pem").unwrap();
        let sink = root
            .issue(&Leaf::new(Role::Sink, "sink.example", 1))
            .unwrap();
        let sink =
            Identity::from_pem(&sink.cert_pem, &sink.key_pem, "sink.pem", "sink.key").unwrap();
        Pki {
            root,
            anchors,
            sink,
        }
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn server(p: &Pki) -> rustls::ServerConfig {
        enrollment_server_config(&p.anchors, &der(p.root.cert_pem()), &p.sink).unwrap()
    }

    #[test]
    fn an_agent_pinned_to_the_root_enrolls_without_a_certificate() {
        let p = pki();
        let pinned = pinned_client_config(fingerprint(&der(p.root.cert_pem()))).unwrap();
        let s = handshake(pinned, server(&p), "sink.example").unwrap();
        assert!(s.peer_certificates().is_none());
        assert_eq!(s.alpn_protocol(), Some(H2));
    }

    #[test]
    fn another_root_or_another_name_is_refused_before_anything_is_sent() {
        let p = pki();
        let other = Ca::generate("another root", 30).unwrap();
        let pinned = pinned_client_config(fingerprint(&der(other.cert_pem()))).unwrap();
        let error = handshake(pinned, server(&p), "sink.example").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("not the sink the token was made for"),
            "{error}"
        );
        let pinned = pinned_client_config(fingerprint(&der(p.root.cert_pem()))).unwrap();
        let error = handshake(pinned, server(&p), "elsewhere.example").unwrap_err();
        assert!(error.to_string().contains("certificate"), "{error}");
    }

    #[test]
    fn a_renewing_agent_presents_its_certificate_and_the_sink_verifies_it() {
        let p = pki();
        let agent = p.root.issue(&Leaf::new(Role::Agent, "site-a", 1)).unwrap();
        let agent = Identity::from_pem(&agent.cert_pem, &agent.key_pem, "a.pem", "a.key").unwrap();
        let renewing = renewal_client_config(&p.anchors, &agent).unwrap();
        let s = handshake(renewing, server(&p), "sink.example").unwrap();
        let presented = s.peer_certificates().expect("a client certificate");
        assert_eq!(crate::load::peer_name(presented).as_deref(), Some("site-a"));

        let stranger = Ca::generate("a stranger's root", 30).unwrap();
        let theirs = stranger
            .issue(&Leaf::new(Role::Agent, "site-a", 1))
            .unwrap();
        let theirs =
            Identity::from_pem(&theirs.cert_pem, &theirs.key_pem, "s.pem", "s.key").unwrap();
        let renewing = renewal_client_config(&p.anchors, &theirs).unwrap();
        assert!(handshake(renewing, server(&p), "sink.example").is_err());
    }
}

//! Reading PEM files and building the rustls configurations: the mutual-TLS policy.
//!
//! The policy, in one place for QUIC and gRPC alike:
//! - TLS 1.3 only. Both ends are ours, so there is no older peer to accommodate, and 1.3
//!   encrypts the certificates themselves (an observer learns no agent names).
//! - The sink requires a client certificate that chains to the configured CA and carries the
//!   clientAuth usage (webpki checks it). A sink certificate (serverAuth only) is refused.
//! - The agent verifies the sink's certificate against the same kind of CA file (not the system
//!   roots) and against the configured server name.
//! - No 0-RTT: early data could be replayed by an attacker, and 0.5-RTT data would reach a
//!   client before it is authenticated. Connections are long-lived, so the saving is nil.
//! - ALPN carries the protocol version, so mismatched versions fail at the handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, RootCertStore};

use crate::{CertInfo, Error, Revocation, refusal};

/// The crypto provider every config uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain with its private key, and the holder's name from the certificate.
#[derive(Debug)]
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    info: CertInfo,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            info: self.info.clone(),
        }
    }
}

impl Identity {
    /// Reads a certificate (chain) and its key from PEM files.
    ///
    /// # Errors
    ///
    /// When a file cannot be read or holds no certificate or key, or the key is not the
    /// certificate's ([`Error::KeyMismatch`]).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, Error> {
        Self::from_pem_bytes(
            &read(cert)?,
            &read(key)?,
            &cert.display().to_string(),
            &key.display().to_string(),
        )
    }

    /// The same from PEM text; `cert_origin` and `key_origin` name the sources in errors.
    ///
    /// # Errors
    ///
    /// When the text holds no certificate or key, or the key is not the certificate's
    /// ([`Error::KeyMismatch`]).
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Self, Error> {
        Self::from_pem_bytes(
            cert_pem.as_bytes(),
            key_pem.as_bytes(),
            cert_origin,
            key_origin,
        )
    }

    pub(crate) fn from_pem_bytes(
        cert_pem: &[u8],
        key_pem: &[u8],
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Self, Error> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Error::NoCertificate(cert_origin.into()))?;
        let first = chain
            .first()
            .ok_or_else(|| Error::NoCertificate(cert_origin.into()))?;
        let info = CertInfo::from_der(first).map_err(|e| Error::UnusableCertificate {
            origin: cert_origin.into(),
            reason: match e {
                Error::InvalidCertificate(reason) => reason,
                other => other.to_string(),
            },
        })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| Error::NoPrivateKey(key_origin.into(), pem_reason(&e)))?;
        check_key(&chain, &key, cert_origin, key_origin)?;
        Ok(Self { chain, key, info })
    }

    /// The certificate chain, leaf first.
    pub(crate) fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key.
    pub(crate) fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// What the leaf certificate says.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// The holder's name (common name, else first DNS name), or `"unnamed"`.
    pub fn name(&self) -> &str {
        self.info.name().unwrap_or("unnamed")
    }
}

/// The CA certificates a peer must chain to.
#[derive(Debug, Clone)]
pub struct TrustAnchors {
    roots: Arc<RootCertStore>,
}

impl TrustAnchors {
    /// Reads every certificate of a PEM file as a trust anchor.
    ///
    /// # Errors
    ///
    /// When the file cannot be read or holds no usable certificate.
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::from_pem_bytes(&read(path)?, &path.display().to_string())
    }

    /// The same from PEM text; `origin` names the source in errors.
    ///
    /// # Errors
    ///
    /// When the text holds no usable certificate.
    pub fn from_pem(pem: &str, origin: &str) -> Result<Self, Error> {
        Self::from_pem_bytes(pem.as_bytes(), origin)
    }

    pub(crate) fn from_pem_bytes(pem: &[u8], origin: &str) -> Result<Self, Error> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|_| Error::NoCertificate(origin.into()))?;
            roots.add(cert).map_err(|e| Error::UnusableCertificate {
                origin: origin.into(),
                reason: certificate_reason(&e),
            })?;
        }
        if roots.is_empty() {
            return Err(Error::NoCertificate(origin.into()));
        }
        Ok(Self {
            roots: Arc::new(roots),
        })
    }

    pub(crate) fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }
}

/// The sink's TLS configuration: TLS 1.3, client certificates required and verified against
/// `ca`, no early data, ALPN `alpn` (in order of preference).
///
/// A refused client certificate's subject is added to the handshake error's text; see
/// [`refusal`](crate::refusal) for the format and [`presented_subject`](crate::presented_subject)
/// to read it back.
///
/// # Errors
///
/// When the identity's key does not match its certificate, or the CA set is unusable.
pub fn server_config(
    ca: &TrustAnchors,
    identity: &Identity,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, Error> {
    server_config_with_crls(ca, identity, alpn, &Revocation::none())
}

/// [`server_config`], refusing the client certificates that `revocation`'s CRLs list (TLS
/// alert `certificate_unknown`, reason `Revoked` in the sink's log).
///
/// Only the agent's own certificate is checked (the CA signs leaves only), and a certificate
/// whose issuer has no CRL here is accepted: a CA file may hold a CA without a CRL.
///
/// # Errors
///
/// As [`server_config`].
pub fn server_config_with_crls(
    ca: &TrustAnchors,
    identity: &Identity,
    alpn: &[&[u8]],
    revocation: &Revocation,
) -> Result<rustls::ServerConfig, Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier(ca, revocation)?)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.max_early_data_size = 0;
    Ok(config)
}

/// The agent's TLS configuration: TLS 1.3, the server verified against `ca` (not the system
/// roots), `identity` presented as the client certificate, no early data, ALPN `alpn` (in order of preference).
///
/// # Errors
///
/// When the identity's key does not match its certificate.
pub fn client_config(
    ca: &TrustAnchors,
    identity: &Identity,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(ca.roots.clone())
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.enable_early_data = false;
    Ok(config)
}

/// The name of a peer from the certificate it presented (the first of its chain).
pub fn peer_name(chain: &[CertificateDer<'_>]) -> Option<String> {
    let info = CertInfo::from_der(chain.first()?).ok()?;
    info.name().map(str::to_owned)
}

/// The sink's client-certificate verifier: webpki against `ca`, a certificate required. The
/// wrapper only adds the presented subject to a refusal's text ([`refusal`]); every decision is
/// webpki's.
pub(crate) fn client_verifier(
    ca: &TrustAnchors,
    revocation: &Revocation,
) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    let webpki = WebPkiClientVerifier::builder_with_provider(ca.roots.clone(), provider())
        .with_crls(revocation.crls().iter().cloned())
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()?;
    Ok(refusal::annotate(webpki))
}

/// Refuses a key that is not the certificate's. rustls would refuse it too, but later (when a
/// config is built) and in words that name neither file.
fn check_key(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    cert_origin: &str,
    key_origin: &str,
) -> Result<(), Error> {
    let signing_key = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| Error::NoPrivateKey(key_origin.into(), e.to_string()))?;
    match CertifiedKey::new(chain.to_vec(), signing_key).keys_match() {
        // `Unknown`: the key type cannot tell its public key (none of ring's); rustls accepts
        // that too, and the handshake would still fail on a wrong key.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => Err(Error::KeyMismatch {
            key: key_origin.into(),
            cert: cert_origin.into(),
        }),
        Err(e) => Err(Error::UnusableCertificate {
            origin: cert_origin.into(),
            reason: certificate_reason(&e),
        }),
    }
}

/// rustls's words for a certificate problem, without its "invalid peer certificate: " (the
/// certificate in question is ours, from a file).
pub(crate) fn certificate_reason(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InvalidCertificate(e) => e.to_string(),
        e => e.to_string(),
    }
}

/// A PEM parse error in words (the parser writes the markers it missed as byte lists).
fn pem_reason(error: &pem::Error) -> String {
    match error {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "no \"-----END {}-----\" line (is the file complete?)",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => {
            format!("malformed line {:?}", String::from_utf8_lossy(line))
        }
        e => e.to_string(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

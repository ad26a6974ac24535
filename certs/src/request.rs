//! Certificate signing requests (PKCS#10): the key is made where it is used, and only the
//! request travels to the CA.
//!
//! - At the site, [`make`] (or [`with_key`], to keep a key) writes a request that names the
//!   agent (subject `CN=NAME`, and the DNS name NAME when it is one) and is signed by its key.
//! - At the CA, [`read`] checks the request and [`Ca::sign_request`] issues an agent
//!   certificate for the request's name and public key. The CA never sees a private key.
//!
//! The policy is the CA's, not the request's: a request names an agent, nothing else. Whatever
//! else it asks for is refused with the reason rather than quietly dropped, so that whoever
//! sent it learns why their certificate is not what they asked for: the sink role (serverAuth),
//! names other than its common name, being a CA, other extensions or attributes, keys a TLS
//! peer of ours cannot verify, a signature that does not verify. What the certificate carries
//! (usage, names, validity) is decided here, by the same rules as `relay-certs issue --role
//! agent`.
//!
//! What this deliberately does not do: sink certificates from requests (a sink's names are
//! what agents verify, so they are the CA operator's to type: `relay-certs issue`), or proof
//! that the requester is who the name says (that is the operator's judgment offline, and the
//! token's online).

use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData, SanType};
use rustls::pki_types::CertificateSigningRequestDer;
use rustls::pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};
use x509_parser::certification_request::{X509CertificationRequest, X509CertificationRequestInfo};
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension, X509Extension};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::issue::leaf_params;
use crate::{Ca, CertInfo, Leaf, Role};

/// The longest name: the upper bound of an X.509 common name (RFC 5280, `ub-common-name`).
pub const MAX_NAME_LEN: usize = 64;

/// Errors from making, reading or signing a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name cannot name an agent (see [`check_name`]).
    #[error("name {name:?} {reason}")]
    Name {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The input is not a certificate signing request.
    #[error("not a certificate signing request: {0}")]
    Malformed(String),
    /// The request is one, but asks for what is not issued for requests, or its signature
    /// does not verify. The text says which, in words for whoever sent it.
    #[error("request refused: {0}")]
    Refused(String),
    /// The validity asked for is empty.
    #[error("invalid validity: {0}")]
    Validity(String),
    /// Making the key or signing failed.
    #[error(transparent)]
    Certs(#[from] crate::Error),
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Self::Certs(e.into())
    }
}

/// A new key and the request signed by it, PEM.
#[derive(Debug, Clone)]
pub struct Request {
    /// The PKCS#8 private key (`PRIVATE KEY`). It stays where it was made: mode 0600.
    pub key_pem: String,
    /// The request (`CERTIFICATE REQUEST`): give it to the CA.
    pub csr_pem: String,
}

/// What a request that passed [`read`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    /// The agent's name (the request's common name).
    pub name: String,
    /// The requester's public key, a DER SubjectPublicKeyInfo.
    pub public_key_der: Vec<u8>,
}

/// How long a certificate signed from a request is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From an hour ago (clock skew) for this many days, as `relay-certs issue --days`.
    Days(u32),
    /// Exactly this window (short-lived certificates, renewals).
    Between {
        /// Start of validity.
        not_before: OffsetDateTime,
        /// End of validity.
        not_after: OffsetDateTime,
    },
}

/// A certificate signed from a request.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// What the agent presents: the leaf, followed by the issuing CA's certificate when the CA
    /// that signed is an issuing CA (never the root).
    pub chain_pem: String,
    /// The agent's name (common name).
    pub name: String,
    /// The serial number, colon-separated hex (as `relay-certs show` prints it).
    pub serial: String,
    /// End of validity (no later than the signing CA's own).
    pub not_after: OffsetDateTime,
}

/// Whether `name` may name an agent (and a file): 1 to 64 bytes, no control characters, no
/// path separators, not starting with a dot, no spaces at either end. `Err` says why.
///
/// # Errors
///
/// As above.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("is empty")
    } else if name.len() > MAX_NAME_LEN {
        Err("is longer than 64 bytes (the limit of a certificate's common name)")
    } else if name.chars().any(char::is_control) {
        Err("holds a control character")
    } else if name.contains(['/', '\\']) || name.starts_with('.') {
        Err("cannot be used as a file name (a path separator, or a leading dot)")
    } else if name.trim() != name {
        Err("starts or ends with a space")
    } else {
        Ok(())
    }
}

/// A new ECDSA P-256 key and a request for `name` signed by it.
///
/// # Errors
///
/// [`Error::Name`] when the name cannot name an agent; [`Error::Certs`] when key generation
/// or signing fails.
pub fn make(name: &str) -> Result<Request, Error> {
    let key = KeyPair::generate()?;
    request(&key, name)
}

/// A new ECDSA P-256 private key, PEM (PKCS#8), for [`with_key`].
///
/// # Errors
///
/// [`Error::Certs`] when key generation fails.
pub fn new_key() -> Result<String, Error> {
    Ok(KeyPair::generate()?.serialize_pem())
}

/// A request for `name` signed by an existing key (PEM), to keep the key across a retry or a
/// renewal.
///
/// # Errors
///
/// As [`make`], and [`Error::Certs`] when the key does not parse.
pub fn with_key(key_pem: &str, name: &str) -> Result<Request, Error> {
    let key = KeyPair::from_pem(key_pem)
        .map_err(|e| crate::Error::NoPrivateKey("key".into(), e.to_string()))?;
    request(&key, name)
}

fn request(key: &KeyPair, name: &str) -> Result<Request, Error> {
    check_name(name).map_err(|reason| Error::Name {
        name: name.into(),
        reason,
    })?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    if rustls::pki_types::DnsName::try_from(name).is_ok() {
        params.subject_alt_names = vec![SanType::DnsName(name.to_owned().try_into()?)];
    }
    let csr = params.serialize_request(key)?;
    Ok(Request {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem()?,
    })
}

/// Parses a request (PEM `CERTIFICATE REQUEST`, or DER), checks its signature against its own
/// key, and applies the policy above.
///
/// # Errors
///
/// [`Error::Malformed`] when it is not a request; [`Error::Refused`] with the reason when it
/// asks for anything but an agent certificate for its name, or its signature does not verify.
pub fn read(csr: &[u8]) -> Result<Requested, Error> {
    let der = if csr.trim_ascii_start().starts_with(b"-----BEGIN") {
        CertificateSigningRequestDer::from_pem_slice(csr)
            .map_err(|e| {
                Error::Malformed(format!("no PEM \"CERTIFICATE REQUEST\" block found ({e})"))
            })?
            .as_ref()
            .to_vec()
    } else {
        csr.to_vec()
    };
    let (rest, request) = X509CertificationRequest::from_der(&der)
        .map_err(|e| Error::Malformed(format!("PKCS#10 does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::Malformed(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    let info = &request.certification_request_info;
    check_key(&info.subject_pki)?;
    request.verify_signature().map_err(|_| {
        Error::Refused(
            "its signature does not verify with the key it carries: the request was altered \
             or damaged after it was signed"
                .into(),
        )
    })?;
    let name = common_name(info)?;
    check_name(&name).map_err(|reason| Error::Refused(format!("its name {name:?} {reason}")))?;
    for attribute in info.iter_attributes() {
        match attribute.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(requested) => {
                for extension in &requested.extensions {
                    check_extension(extension, &name)?;
                }
            }
            ParsedCriAttribute::ChallengePassword(_) => {
                return Err(Error::Refused(
                    "it carries a challenge password, which is not used here; make the request \
                     without one"
                        .into(),
                ));
            }
            ParsedCriAttribute::UnsupportedAttribute => {
                return Err(Error::Refused(format!(
                    "it carries attribute {}, which is not used here",
                    attribute.oid
                )));
            }
        }
    }
    Ok(Requested {
        name,
        public_key_der: info.subject_pki.raw.to_vec(),
    })
}

/// The subject's one common name; anything else in the subject is refused.
fn common_name(info: &X509CertificationRequestInfo<'_>) -> Result<String, Error> {
    let subject = &info.subject;
    let mut attributes = subject.iter().flat_map(|rdn| rdn.iter());
    let (Some(only), None) = (attributes.next(), attributes.next()) else {
        return Err(Error::Refused(format!(
            "its subject must be one common name (CN=NAME), not {:?}: the CA names the \
             certificate, and only by its common name",
            subject.to_string()
        )));
    };
    if only.attr_type() != &x509_parser::oid_registry::OID_X509_COMMON_NAME {
        return Err(Error::Refused(format!(
            "its subject {:?} has no common name (CN=NAME)",
            subject.to_string()
        )));
    }
    only.as_str()
        .map(str::to_owned)
        .map_err(|_| Error::Refused("its common name is not text".into()))
}

/// Refuses an extension the CA would not put in an agent's certificate.
fn check_extension(extension: &X509Extension<'_>, name: &str) -> Result<(), Error> {
    let refuse = |reason: String| Err(Error::Refused(reason));
    match extension.parsed_extension() {
        ParsedExtension::BasicConstraints(bc) if bc.ca => refuse(
            "it asks to be a CA (basicConstraints CA:TRUE); requests get agent certificates \
             only"
                .into(),
        ),
        ParsedExtension::BasicConstraints(_) => Ok(()),
        ParsedExtension::ExtendedKeyUsage(eku) if eku.server_auth => refuse(
            "it asks for the sink role (serverAuth); only agent certificates are issued for \
             requests (sinks: `relay-certs issue --role sink`)"
                .into(),
        ),
        ParsedExtension::ExtendedKeyUsage(eku)
            if eku.any
                || eku.code_signing
                || eku.email_protection
                || eku.time_stamping
                || eku.ocsp_signing
                || !eku.other.is_empty() =>
        {
            refuse(
                "it asks for an extended key usage other than clientAuth; agent certificates \
                 carry clientAuth only"
                    .into(),
            )
        }
        ParsedExtension::ExtendedKeyUsage(_) => Ok(()),
        ParsedExtension::KeyUsage(ku) if ku.flags & !1 != 0 => refuse(format!(
            "it asks for key usage {ku}; agent certificates carry Digital Signature only"
        )),
        ParsedExtension::KeyUsage(_) => Ok(()),
        ParsedExtension::SubjectAlternativeName(san) => {
            let others: Vec<String> = san
                .general_names
                .iter()
                .filter(|n| !matches!(n, GeneralName::DNSName(dns) if *dns == name))
                .map(general_name)
                .collect();
            if others.is_empty() {
                Ok(())
            } else {
                refuse(format!(
                    "it asks for names other than its common name {name:?} ({}); a certificate \
                     for a request names only its common name",
                    others.join(", ")
                ))
            }
        }
        _ => refuse(format!(
            "it asks for extension {}{}, which agent certificates do not carry",
            extension.oid,
            if extension.critical {
                " (critical)"
            } else {
                ""
            }
        )),
    }
}

/// A subject alternative name as `relay-certs show` prints one (`DNS:…`, `IP:…`).
fn general_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::IPAddress(ip) => match (<[u8; 4]>::try_from(*ip), <[u8; 16]>::try_from(*ip)) {
            (Ok(v4), _) => format!("IP:{}", std::net::Ipv4Addr::from(v4)),
            (_, Ok(v6)) => format!("IP:{}", std::net::Ipv6Addr::from(v6)),
            _ => format!("IP:{ip:02x?}"),
        },
        other => other.to_string(),
    }
}

/// Refuses a key a TLS peer of ours cannot verify (rustls with ring): ECDSA P-256 and P-384,
/// Ed25519 and RSA of 2,048 bits or more are accepted.
fn check_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<(), Error> {
    let unsupported = || {
        Error::Refused(format!(
            "its key type ({}) is not one the relay's TLS verifies; use ECDSA P-256 (what \
             `relay-certs request` makes), P-384, Ed25519 or RSA of 2048 bits or more",
            spki.algorithm.algorithm
        ))
    };
    let key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw).map_err(|_| unsupported())?;
    let algorithm = key.algorithm();
    if algorithm == &rcgen::PKCS_RSA_SHA256 {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => 0,
        };
        if bits < 2048 {
            return Err(Error::Refused(format!(
                "its RSA key has {bits} bits; at least 2048 are needed"
            )));
        }
        return Ok(());
    }
    let accepted = [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ];
    if accepted.contains(&algorithm) {
        Ok(())
    } else {
        Err(unsupported())
    }
}

impl Validity {
    /// The window, from `now`.
    fn window(self, now: OffsetDateTime) -> Result<(OffsetDateTime, OffsetDateTime), Error> {
        let (not_before, not_after) = match self {
            Self::Days(days) => (
                now - Duration::hours(1),
                now + Duration::days(i64::from(days)),
            ),
            Self::Between {
                not_before,
                not_after,
            } => (not_before, not_after),
        };
        if not_after <= now || not_after <= not_before {
            return Err(Error::Validity(format!(
                "the certificate would end at {}, before it is of use",
                crate::inspect::rfc3339(not_after)
            )));
        }
        Ok((not_before, not_after))
    }
}

impl Ca {
    /// Issues an agent certificate for a request that passes [`read`]: the request's name and
    /// public key, clientAuth, valid for `validity` but no longer than this CA. The chain is
    /// the leaf followed by this CA's certificate when this is an issuing CA.
    ///
    /// # Errors
    ///
    /// As [`read`]; [`Error::Validity`] for an empty window; [`Error::Certs`] when signing
    /// fails.
    pub fn sign_request(&self, csr: &[u8], validity: Validity) -> Result<Signed, Error> {
        self.sign_requested(read(csr)?, validity)
    }

    /// [`sign_request`](Self::sign_request) for a request already [`read`] (so that a caller
    /// that checks it first, for its name, does not parse and verify it twice).
    ///
    /// # Errors
    ///
    /// [`Error::Validity`] for an empty window; [`Error::Certs`] when signing fails.
    pub fn sign_requested(
        &self,
        requested: Requested,
        validity: Validity,
    ) -> Result<Signed, Error> {
        let key = rcgen::SubjectPublicKeyInfo::from_der(&requested.public_key_der)?;
        let (not_before, not_after) = validity.window(OffsetDateTime::now_utc())?;
        let (_, ca_not_after) = self.constraints()?;
        let mut leaf = Leaf::new(Role::Agent, requested.name.clone(), 1);
        leaf.not_before = not_before;
        leaf.not_after = not_after.min(ca_not_after);
        let cert = leaf_params(&leaf)?.signed_by(&key, self.issuer())?;
        let cert_pem = cert.pem();
        let info = CertInfo::from_pem(&cert_pem)?;
        Ok(Signed {
            chain_pem: self.leaf_chain(&cert_pem),
            cert_pem,
            name: requested.name,
            serial: info.serial,
            not_after: info.not_after,
        })
    }
}

#[cfg(test)]
mod tests;

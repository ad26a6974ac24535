//! Making the CA and the leaf certificates (rcgen).
//!
//! Keys are ECDSA P-256: small, fast to verify, and supported by every TLS 1.3 stack. Leaf
//! certificates carry exactly one extended key usage, so a sink's certificate cannot be used to
//! connect as an agent and an agent's cannot serve as a sink.
//!
//! File handling (modes, `--force`) belongs to the `relay-certs` binary, not here.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::Error;

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A relay agent: a TLS client (extended key usage clientAuth).
    Agent,
    /// A relay sink: a TLS server (extended key usage serverAuth).
    Sink,
}

impl Role {
    /// `"agent"` or `"sink"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Sink => "sink",
        }
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (`CERTIFICATE` block).
    pub cert_pem: String,
    /// The PKCS#8 private key (`PRIVATE KEY` block). Keep it secret: mode 0600.
    pub key_pem: String,
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Agent or sink.
    pub role: Role,
    /// The subject common name. For an agent this is its identity in the sink's logs and
    /// metrics; for a sink it is also a DNS name the agent can verify.
    pub name: String,
    /// Further DNS names (subject alternative names).
    pub dns: Vec<String>,
    /// IP addresses (subject alternative names), for sinks reached by address.
    pub ips: Vec<IpAddr>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl Leaf {
    /// A leaf valid from an hour ago (to tolerate clock skew) for `days` days.
    pub fn new(role: Role, name: impl Into<String>, days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            role,
            name: name.into(),
            dns: Vec::new(),
            ips: Vec::new(),
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        }
    }
}

/// A certificate authority that can sign leaves.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA named `common_name`, valid for `days` days.
    ///
    /// # Errors
    ///
    /// When key generation or signing fails.
    pub fn generate(common_name: &str, days: u32) -> Result<Self, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        // Path length 0: this CA signs leaves only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(i64::from(days));
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its PEM certificate and private key (as written by `relay-certs init`).
    ///
    /// # Errors
    ///
    /// When either does not parse.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| Error::NoPrivateKey("CA key".into(), e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// The CA certificate, PEM: give it to every agent and sink.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM: keep it offline.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA as rcgen's signer (for CRLs).
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// Signs a new leaf certificate with a fresh key.
    ///
    /// # Errors
    ///
    /// When a name is not a valid DNS name, or signing fails.
    pub fn issue(&self, leaf: &Leaf) -> Result<Issued, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.name.as_str());
        let mut sans = Vec::new();
        // The name doubles as a DNS SAN when it is one, so `--name sink.example.com` is enough.
        for dns in std::iter::once(&leaf.name).chain(&leaf.dns) {
            let valid = rustls::pki_types::DnsName::try_from(dns.as_str()).is_ok();
            if valid {
                sans.push(SanType::DnsName(dns.clone().try_into()?));
            } else if dns != &leaf.name {
                return Err(Error::InvalidName(dns.clone()));
            }
        }
        // A name that is an address (`--name 192.0.2.7`) is verified as an IP SAN.
        let name_ip = leaf.name.parse::<IpAddr>().ok();
        sans.extend(
            name_ip
                .iter()
                .chain(&leaf.ips)
                .map(|ip| SanType::IpAddress(*ip)),
        );
        sans.dedup();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match leaf.role {
            Role::Agent => ExtendedKeyUsagePurpose::ClientAuth,
            Role::Sink => ExtendedKeyUsagePurpose::ServerAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        params.not_before = leaf.not_before;
        params.not_after = leaf.not_after;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// 16 random bytes with the top bit clear (a positive INTEGER, RFC 5280 §4.1.2.2).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CertInfo;

    #[test]
    fn leaves_carry_one_usage_and_their_names() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let mut sink = Leaf::new(Role::Sink, "sink.example.com", 10);
        sink.ips.push("127.0.0.1".parse().unwrap());
        sink.dns.push("relay.example.net".into());
        let sink = CertInfo::from_pem(&ca.issue(&sink).unwrap().cert_pem).unwrap();
        assert_eq!(sink.common_name.as_deref(), Some("sink.example.com"));
        assert_eq!(sink.extended_key_usages, vec!["serverAuth"]);
        assert_eq!(
            sink.subject_alt_names,
            vec![
                "DNS:sink.example.com",
                "DNS:relay.example.net",
                "IP:127.0.0.1"
            ]
        );
        assert!(!sink.is_ca);

        let agent = ca.issue(&Leaf::new(Role::Agent, "site-a", 10)).unwrap();
        let agent = CertInfo::from_pem(&agent.cert_pem).unwrap();
        assert_eq!(agent.extended_key_usages, vec!["clientAuth"]);
        assert_eq!(agent.name(), Some("site-a"));
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        let leaf = again.issue(&Leaf::new(Role::Agent, "a", 1)).unwrap();
        let info = CertInfo::from_pem(&leaf.cert_pem).unwrap();
        assert!(info.issuer.contains("test CA"), "{}", info.issuer);
        assert!(CertInfo::from_pem(ca.cert_pem()).unwrap().is_ca);
    }

    #[test]
    fn a_name_that_is_an_address_becomes_an_ip_san() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let leaf = ca.issue(&Leaf::new(Role::Sink, "192.0.2.7", 1)).unwrap();
        let info = CertInfo::from_pem(&leaf.cert_pem).unwrap();
        assert_eq!(info.subject_alt_names, vec!["IP:192.0.2.7"]);
    }

    #[test]
    fn bad_extra_dns_name_is_an_error() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let mut leaf = Leaf::new(Role::Sink, "sink", 1);
        leaf.dns.push("not a dns name!".into());
        assert!(ca.issue(&leaf).is_err());
    }
}

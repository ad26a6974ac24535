//! Making the CAs and the leaf certificates (rcgen).
//!
//! Keys are ECDSA P-256: small, fast to verify, and supported by every TLS 1.3 stack. Leaf
//! certificates carry exactly one extended key usage, so a sink's certificate cannot be used to
//! connect as an agent and an agent's cannot serve as a sink.
//!
//! Two kinds of CA: the root (`relay-certs init`, path length 1: it may sign one issuing CA),
//! and an issuing CA under it (`relay-certs init-issuer`, path length 0: leaves only), so that
//! the root's key can stay offline while a sink issues. A leaf issued by an issuing CA is handed
//! out as a chain (leaf, then the issuing CA); peers trust only the root and webpki builds the
//! path through the intermediate. Roots made before issuing CAs existed have path length 0 and
//! cannot sign one ([`Ca::generate_issuer`] says so).
//!
//! File handling (modes, `--force`) belongs to the `relay-certs` binary, not here; reading a
//! CA folder ([`Ca::load_dir`]) is here, because the sink loads one too.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

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

/// A certificate authority that can sign leaves: a root, or an issuing CA under one.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    /// For an issuing CA: the root certificate that signed it, when known (PEM).
    root_pem: Option<String>,
    /// Whether this CA's certificate is signed by another (an issuing CA), not self-signed.
    intermediate: bool,
}

/// The files of a CA folder: a root's (`relay-certs init`) or an issuing CA's
/// (`relay-certs init-issuer`, which also holds a copy of the root as `ca.pem`).
pub mod files {
    /// The root certificate (in an issuing CA's folder: a copy of it).
    pub const ROOT_CERT: &str = "ca.pem";
    /// The root's private key.
    pub const ROOT_KEY: &str = "ca.key";
    /// The issuing CA's certificate.
    pub const ISSUER_CERT: &str = "issuer.pem";
    /// The issuing CA's private key.
    pub const ISSUER_KEY: &str = "issuer.key";
    /// The CA's revocation list.
    pub const CRL: &str = "crl.pem";
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed root CA named `common_name`, valid for `days` days, with path length
    /// 1: it signs leaves and at most one level of issuing CA.
    ///
    /// # Errors
    ///
    /// When key generation or signing fails.
    pub fn generate(common_name: &str, days: u32) -> Result<Self, Error> {
        let key = KeyPair::generate()?;
        let params = ca_params(common_name, 1, OffsetDateTime::now_utc(), days);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            root_pem: None,
            intermediate: false,
        })
    }

    /// A new issuing CA named `common_name` signed by `root`, valid for `days` days (at most
    /// until the root expires), with path length 0: it signs leaves only.
    ///
    /// # Errors
    ///
    /// [`Error::UnusableCertificate`] when `root` is itself an issuing CA or was made with
    /// path length 0 (before issuing CAs existed); [`Error::Rcgen`] when signing fails.
    pub fn generate_issuer(root: &Self, common_name: &str, days: u32) -> Result<Self, Error> {
        root.may_sign_issuer()
            .map_err(|reason| Error::UnusableCertificate {
                origin: files::ROOT_CERT.into(),
                reason: reason.into(),
            })?;
        let (_, root_not_after) = root.constraints()?;
        let key = KeyPair::generate()?;
        let now = OffsetDateTime::now_utc();
        let mut params = ca_params(common_name, 0, now, days);
        params.not_after = params.not_after.min(root_not_after);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &root.issuer)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            root_pem: Some(root.cert_pem.clone()),
            intermediate: true,
        })
    }

    /// A CA from its PEM certificate and private key (as written by `relay-certs init`, or an
    /// issuing CA's without its root: see [`Ca::issuer_from_pem`]).
    ///
    /// # Errors
    ///
    /// When either does not parse.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| Error::NoPrivateKey("CA key".into(), e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        let info = crate::CertInfo::from_pem(cert_pem)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            root_pem: None,
            intermediate: info.subject != info.issuer,
        })
    }

    /// An issuing CA from its certificate and key and the root that signed it (PEM).
    ///
    /// # Errors
    ///
    /// When one does not parse.
    pub fn issuer_from_pem(cert_pem: &str, key_pem: &str, root_pem: &str) -> Result<Self, Error> {
        crate::CertInfo::from_pem(root_pem)?;
        let mut ca = Self::from_pem(cert_pem, key_pem)?;
        ca.root_pem = Some(root_pem.to_owned());
        ca.intermediate = true;
        Ok(ca)
    }

    /// The CA of a folder: its issuing CA when it holds `issuer.pem` and `issuer.key` (with the
    /// root from `ca.pem`), else its root (`ca.pem`, `ca.key`).
    ///
    /// # Errors
    ///
    /// [`Error::Read`] when a file is missing or unreadable; parse errors as
    /// [`Ca::from_pem`].
    pub fn load_dir(dir: &Path) -> Result<Self, Error> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| Error::Read { path, source })
        };
        if dir.join(files::ISSUER_CERT).exists() || dir.join(files::ISSUER_KEY).exists() {
            return Self::issuer_from_pem(
                &read(files::ISSUER_CERT)?,
                &read(files::ISSUER_KEY)?,
                &read(files::ROOT_CERT)?,
            );
        }
        Self::from_pem(&read(files::ROOT_CERT)?, &read(files::ROOT_KEY)?)
    }

    /// The CA certificate, PEM: for a root, give it to every agent and sink.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// What a leaf issued by this CA presents after its own certificate: for a root, its
    /// certificate; for an issuing CA, its certificate (`issuer.pem`) and never the root,
    /// which peers hold already.
    pub fn chain_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// A leaf certificate as it is handed out: the leaf alone under a root, the leaf and
    /// [`Ca::chain_pem`] under an issuing CA.
    pub fn leaf_chain(&self, leaf_pem: &str) -> String {
        if self.intermediate {
            let mut chain = leaf_pem.to_owned();
            if !chain.ends_with('\n') {
                chain.push('\n');
            }
            chain.push_str(&self.chain_pem());
            chain
        } else {
            leaf_pem.to_owned()
        }
    }

    /// Whether this is an issuing CA (signed by a root) rather than a root.
    pub fn is_issuer(&self) -> bool {
        self.intermediate
    }

    /// The root certificate peers trust (PEM): this CA's own for a root, the one that signed
    /// it for an issuing CA (`None` when it was loaded without it).
    pub fn root_pem(&self) -> Option<&str> {
        if self.intermediate {
            self.root_pem.as_deref()
        } else {
            Some(&self.cert_pem)
        }
    }

    /// Whether this CA may sign an issuing CA: `Err` with the reason (in words that follow the
    /// root certificate's file name) when it is an issuing CA itself, or a root made with path
    /// length 0.
    ///
    /// # Errors
    ///
    /// As above.
    pub fn may_sign_issuer(&self) -> Result<(), &'static str> {
        if self.intermediate {
            return Err(
                "is an issuing CA, not a root: give the root's folder (made by \
                 `relay-certs init`)",
            );
        }
        match self.constraints() {
            Ok((Some(0), _)) => Err("was made with path length 0, so it cannot sign an issuing \
                 CA; make a new root with `relay-certs init` (roots made since can), and \
                 re-issue the certificates"),
            Ok(_) => Ok(()),
            Err(_) => Err("does not parse as a certificate"),
        }
    }

    /// The certificate's path length constraint (`None`: unconstrained) and its expiry.
    pub(crate) fn constraints(&self) -> Result<(Option<u32>, OffsetDateTime), Error> {
        let der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| Error::InvalidCertificate(e.to_string()))?;
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| Error::InvalidCertificate(e.to_string()))?;
        let path_len = match cert.basic_constraints() {
            Ok(Some(bc)) => bc.value.path_len_constraint,
            _ => None,
        };
        Ok((path_len, cert.validity().not_after.to_datetime()))
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
        let cert = leaf_params(leaf)?.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The certificate parameters of `leaf`: its name (also a DNS or IP subject alternative name
/// when it is one), its extra names, one key usage (digitalSignature) and one extended key
/// usage for its role, a random serial. The same for `issue` and for signed requests.
///
/// # Errors
///
/// When an extra name is not a valid DNS name.
pub(crate) fn leaf_params(leaf: &Leaf) -> Result<CertificateParams, Error> {
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
    Ok(params)
}

/// A CA certificate's parameters: `common_name`, path length `path_len`, valid from an hour
/// before `now` (clock skew) for `days` days, signing certificates and CRLs.
fn ca_params(common_name: &str, path_len: u8, now: OffsetDateTime, days: u32) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
    params.serial_number = Some(random_serial());
    params
}

/// 16 random bytes with the top bit clear (a positive INTEGER, RFC 5280 §4.1.2.2).
pub(crate) fn random_serial() -> SerialNumber {
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
    fn roots_may_sign_one_issuing_ca_which_signs_leaves_only() {
        let root = Ca::generate("root", 30).unwrap();
        let info = CertInfo::from_pem(root.cert_pem()).unwrap();
        assert!(info.is_ca && !root.is_issuer());
        assert_eq!(root.constraints().unwrap().0, Some(1));
        let issuer = Ca::generate_issuer(&root, "sink issuer", 3650).unwrap();
        assert!(issuer.is_issuer());
        assert_eq!(issuer.root_pem(), Some(root.cert_pem()));
        let (path_len, not_after) = issuer.constraints().unwrap();
        assert_eq!(path_len, Some(0));
        assert!(
            not_after <= root.constraints().unwrap().1,
            "not past the root"
        );
        let info = CertInfo::from_pem(issuer.cert_pem()).unwrap();
        assert!(
            info.is_ca && info.issuer.contains("root"),
            "{}",
            info.issuer
        );

        let error = Ca::generate_issuer(&issuer, "deeper", 1)
            .unwrap_err()
            .to_string();
        assert!(error.contains("is an issuing CA, not a root"), "{error}");
    }

    #[test]
    fn a_root_of_path_length_0_cannot_sign_an_issuing_ca() {
        // A root as `relay-certs init` made them before issuing CAs existed.
        let key = KeyPair::generate().unwrap();
        let params = ca_params("old root", 0, OffsetDateTime::now_utc(), 30);
        let cert = params.self_signed(&key).unwrap();
        let old = Ca::from_pem(&cert.pem(), &key.serialize_pem()).unwrap();
        let error = Ca::generate_issuer(&old, "issuer", 30)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("ca.pem") && error.contains("path length 0"),
            "{error}"
        );
        assert!(error.contains("relay-certs init"), "{error}");
    }

    #[test]
    fn an_issuing_ca_folder_loads_as_an_issuer_and_hands_out_chains() {
        let dir = tempfile::tempdir().unwrap();
        let root = Ca::generate("root", 30).unwrap();
        let issuer = Ca::generate_issuer(&root, "issuer", 30).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write(files::ROOT_CERT, root.cert_pem());
        write(files::ISSUER_CERT, issuer.cert_pem());
        write(files::ISSUER_KEY, &issuer.key_pem());
        let loaded = Ca::load_dir(dir.path()).unwrap();
        assert!(loaded.is_issuer());
        assert_eq!(loaded.root_pem(), Some(root.cert_pem()));
        let leaf = loaded.issue(&Leaf::new(Role::Agent, "a", 1)).unwrap();
        let chain = loaded.leaf_chain(&leaf.cert_pem);
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(chain.starts_with(&leaf.cert_pem) && chain.ends_with(issuer.cert_pem()));
        assert_eq!(
            root.leaf_chain(&leaf.cert_pem),
            leaf.cert_pem,
            "a root's: the leaf"
        );

        std::fs::remove_file(dir.path().join(files::ISSUER_KEY)).unwrap();
        let error = Ca::load_dir(dir.path()).unwrap_err().to_string();
        assert!(error.contains("issuer.key"), "{error}");
    }

    #[test]
    fn bad_extra_dns_name_is_an_error() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let mut leaf = Leaf::new(Role::Sink, "sink", 1);
        leaf.dns.push("not a dns name!".into());
        assert!(ca.issue(&leaf).is_err());
    }
}

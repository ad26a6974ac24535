//! Reading what a certificate says: subject, names, usage, validity.
//!
//! Used by `relay-certs show`, by the sink to name an agent from its certificate, and by both
//! binaries to log their own identity at start-up. Verification is rustls's job, not this one's.

use std::fmt;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::Error;

/// The facts of one certificate that an operator asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject distinguished name, e.g. `CN=site-a`.
    pub subject: String,
    /// The subject's common name, when there is one.
    pub common_name: Option<String>,
    /// The issuer distinguished name.
    pub issuer: String,
    /// Serial number, colon-separated hex.
    pub serial: String,
    /// Subject alternative names as `DNS:…`, `IP:…`, `URI:…`.
    pub subject_alt_names: Vec<String>,
    /// Extended key usages: `clientAuth`, `serverAuth`, ….
    pub extended_key_usages: Vec<&'static str>,
    /// Whether this is a CA certificate.
    pub is_ca: bool,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl CertInfo {
    /// Parses a DER certificate.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidCertificate`] when it is not X.509.
    pub fn from_der(der: &[u8]) -> Result<Self, Error> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| Error::InvalidCertificate(e.to_string()))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let mut subject_alt_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                subject_alt_names.push(match name {
                    GeneralName::DNSName(d) => format!("DNS:{d}"),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => format!(
                            "IP:{}",
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap())
                        ),
                        16 => format!(
                            "IP:{}",
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap())
                        ),
                        _ => format!("IP:{ip:02x?}"),
                    },
                    GeneralName::URI(u) => format!("URI:{u}"),
                    GeneralName::RFC822Name(m) => format!("email:{m}"),
                    other => format!("{other:?}"),
                });
            }
        }
        let mut extended_key_usages = Vec::new();
        if let Ok(Some(eku)) = cert.extended_key_usage() {
            let eku = eku.value;
            for (on, name) in [
                (eku.any, "any"),
                (eku.server_auth, "serverAuth"),
                (eku.client_auth, "clientAuth"),
                (eku.code_signing, "codeSigning"),
                (eku.email_protection, "emailProtection"),
                (eku.time_stamping, "timeStamping"),
                (eku.ocsp_signing, "OCSPSigning"),
            ] {
                if on {
                    extended_key_usages.push(name);
                }
            }
        }
        let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        let validity = cert.validity();
        Ok(Self {
            subject: cert.subject().to_string(),
            common_name,
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string(),
            subject_alt_names,
            extended_key_usages,
            is_ca,
            not_before: validity.not_before.to_datetime(),
            not_after: validity.not_after.to_datetime(),
        })
    }

    /// Parses the first certificate of a PEM text.
    ///
    /// # Errors
    ///
    /// When there is no certificate, or it is not X.509.
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| Error::NoCertificate("PEM text".into()))?;
        Self::from_der(&der)
    }

    /// The name that identifies the holder: the common name, else the first DNS name.
    pub fn name(&self) -> Option<&str> {
        self.common_name.as_deref().or_else(|| {
            self.subject_alt_names
                .iter()
                .find_map(|s| s.strip_prefix("DNS:"))
        })
    }

    /// Seconds until the certificate expires (negative once it has).
    pub fn seconds_to_expiry(&self) -> i64 {
        (self.not_after - OffsetDateTime::now_utc()).whole_seconds()
    }
}

impl fmt::Display for CertInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.seconds_to_expiry() / 86_400;
        writeln!(f, "subject:      {}", self.subject)?;
        writeln!(f, "issuer:       {}", self.issuer)?;
        writeln!(f, "serial:       {}", self.serial)?;
        writeln!(f, "CA:           {}", if self.is_ca { "yes" } else { "no" })?;
        writeln!(f, "names (SAN):  {}", list_or_none(&self.subject_alt_names))?;
        let ekus: Vec<String> = self
            .extended_key_usages
            .iter()
            .map(|s| s.to_string())
            .collect();
        writeln!(f, "usage (EKU):  {}", list_or_none(&ekus))?;
        writeln!(f, "not before:   {}", rfc3339(self.not_before))?;
        write!(f, "not after:    {}", rfc3339(self.not_after))?;
        if days >= 0 {
            write!(f, " (expires in {days} days)")
        } else {
            write!(f, " (EXPIRED {} days ago)", -days)
        }
    }
}

/// A time as RFC 3339 text (`2026-11-27T00:00:00Z`), for logs.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

//! Certificate revocation lists: writing them (`relay-certs revoke`) and reading them back for
//! the sink, which refuses a revoked agent at the handshake (webpki checks the CRL) and closes
//! the open connections of an agent revoked while connected (which needs the list of serials,
//! [`Revocation::is_revoked`]).
//!
//! One CRL per CA, next to it: `DIR/crl.pem`. `relay-certs init` (and `init-issuer`) write an
//! empty one ([`Ca::empty_crl`], CRL number 1), so a sink can be given `--crl` from the first
//! day. Each `revoke` re-signs the whole list with the
//! previous entries plus the new one, a CRL number one higher than the last, `thisUpdate` now
//! and `nextUpdate` `days` later. The sink does not refuse a CRL past its `nextUpdate`: an
//! outdated list still revokes what it lists, and refusing every agent because nobody re-ran
//! `revoke` would turn a forgotten chore into an outage.
//!
//! A CRL is checked before it is used: it must parse, and be signed by a CA certificate of the
//! CA file (by subject and signature). A CRL that fails is refused as a whole, so a corrupt or
//! foreign list can neither lock out every agent nor silently revoke nothing.
//!
//! An issuing CA keeps its own `crl.pem` (signed by it) for the leaves it issued, with its
//! certificate after the list. The sink accepts a list signed by a CA certificate of its CA
//! file, or by a CA certificate in the CRL file itself that one of those signed (so a sink
//! that trusts only the root can use the issuing CA's list).
//!
//! What this deliberately does not do: fetch CRLs (no distribution points, no OCSP), or check
//! CA certificates against a list (only the agent's own certificate is checked; to distrust an
//! issuing CA, make a new root).

use std::collections::HashSet;

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::{Ca, CertInfo, Error};

/// The CRLs a sink checks agents against, and the serials they list.
#[derive(Debug, Clone, Default)]
pub struct Revocation {
    crls: Vec<CertificateRevocationListDer<'static>>,
    /// (issuer distinguished name, serial as colon-separated hex), as [`CertInfo`] writes them.
    revoked: HashSet<(String, String)>,
}

impl Revocation {
    /// No CRL: nothing is revoked.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads every `X509 CRL` block of `crl_pem` and checks each against the CA certificates
    /// in `ca_pem`; `origin` names the CRL file in errors.
    ///
    /// # Errors
    ///
    /// [`Error::Crl`] when the text holds no CRL, a CRL does not parse, or no CA certificate of
    /// `ca_pem` has signed it.
    pub fn from_pem(crl_pem: &[u8], ca_pem: &[u8], origin: &str) -> Result<Self, Error> {
        let refuse = |reason: String| Error::Crl {
            origin: origin.into(),
            reason,
        };
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(ca_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| refuse(format!("cannot read the CA file: {e}")))?;
        let crls: Vec<CertificateRevocationListDer<'static>> =
            CertificateRevocationListDer::pem_slice_iter(crl_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| refuse(format!("not PEM: {e}")))?;
        if crls.is_empty() {
            return Err(refuse(
                "no CRL found (expected a PEM \"X509 CRL\" block)".into(),
            ));
        }
        let signers = signers(&cas, crl_pem);
        let mut revoked = HashSet::new();
        for der in &crls {
            let (_, crl) = CertificateRevocationList::from_der(der)
                .map_err(|e| refuse(format!("not a CRL: {e}")))?;
            let issuer = crl.issuer().to_string();
            let signed = signers.iter().any(|ca| {
                X509Certificate::from_der(ca).is_ok_and(|(_, ca)| {
                    ca.subject() == crl.issuer() && crl.verify_signature(ca.public_key()).is_ok()
                })
            });
            if !signed {
                return Err(refuse(format!(
                    "not signed by a CA of the CA file, nor by an issuing CA of it whose \
                     certificate the file holds (CRL issuer {issuer:?})"
                )));
            }
            for entry in crl.iter_revoked_certificates() {
                revoked.insert((issuer.clone(), entry.raw_serial_as_string()));
            }
        }
        Ok(Self { crls, revoked })
    }

    /// The CRLs, for the verifier.
    pub(crate) fn crls(&self) -> &[CertificateRevocationListDer<'static>] {
        &self.crls
    }

    /// Whether the certificate described by `info` is listed.
    pub fn is_revoked(&self, info: &CertInfo) -> bool {
        self.revoked
            .contains(&(info.issuer.clone(), info.serial.clone()))
    }

    /// How many certificates are listed.
    pub fn len(&self) -> usize {
        self.revoked.len()
    }

    /// Whether no certificate is listed.
    pub fn is_empty(&self) -> bool {
        self.revoked.is_empty()
    }
}

/// Who may sign a CRL: the CA certificates of the CA file, and the CA certificates found in
/// the CRL file that one of them signed (an issuing CA's, written after its list).
fn signers<'a>(cas: &'a [CertificateDer<'static>], crl_pem: &[u8]) -> Vec<CertificateDer<'a>> {
    let mut signers: Vec<CertificateDer<'a>> = cas.to_vec();
    for cert in CertificateDer::pem_slice_iter(crl_pem).flatten() {
        let Ok((_, issuing)) = X509Certificate::from_der(&cert) else {
            continue;
        };
        let vouched = issuing.is_ca()
            && cas.iter().any(|ca| {
                X509Certificate::from_der(ca).is_ok_and(|(_, ca)| {
                    ca.subject() == issuing.issuer()
                        && issuing.verify_signature(Some(ca.public_key())).is_ok()
                })
            });
        if vouched {
            signers.push(cert);
        }
    }
    signers
}

/// A CRL written by [`Ca::revoke`].
#[derive(Debug, Clone)]
pub struct Crl {
    /// The CRL, PEM (`X509 CRL` block).
    pub pem: String,
    /// Its CRL number: one more than the list it replaces, 1 for the first.
    pub number: u64,
    /// Certificates it lists.
    pub entries: usize,
    /// Whether the serial asked for was listed already (the list is re-signed all the same).
    pub already_listed: bool,
    /// When the next list is due (`nextUpdate`).
    pub next_update: OffsetDateTime,
}

impl Ca {
    /// An empty CRL (nothing revoked), CRL number 1, due again in `days`: what `relay-certs
    /// init` writes, so that sinks can point `--crl` at it before anything is revoked.
    ///
    /// # Errors
    ///
    /// [`Error::Rcgen`] when signing fails.
    pub fn empty_crl(&self, days: u32) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        self.sign_crl(now, Vec::new(), 1, days)?
            .pem()
            .map_err(Error::from)
    }

    /// Signs a new CRL: the entries of `previous` (a CRL this CA signed, PEM), if any, plus
    /// `serial` (raw bytes, as in the certificate), numbered one higher, due again in `days`.
    ///
    /// # Errors
    ///
    /// [`Error::Crl`] when `previous` does not parse; [`Error::Rcgen`] when signing fails.
    pub fn revoke(&self, previous: Option<&str>, serial: &[u8], days: u32) -> Result<Crl, Error> {
        let now = OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::new();
        let mut number = 0u64;
        let new_serial = SerialNumber::from_slice(serial);
        let mut already_listed = false;
        if let Some(pem) = previous {
            let der =
                CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
                    Error::Crl {
                        origin: "previous CRL".into(),
                        reason: e.to_string(),
                    }
                })?;
            let (_, crl) = CertificateRevocationList::from_der(&der).map_err(|e| Error::Crl {
                origin: "previous CRL".into(),
                reason: e.to_string(),
            })?;
            number = crl
                .crl_number()
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(0);
            for entry in crl.iter_revoked_certificates() {
                let serial = SerialNumber::from_slice(entry.raw_serial());
                already_listed |= serial == new_serial;
                revoked_certs.push(RevokedCertParams {
                    serial_number: serial,
                    revocation_time: entry.revocation_date.to_datetime(),
                    reason_code: None,
                    invalidity_date: None,
                });
            }
        }
        if !already_listed {
            revoked_certs.push(RevokedCertParams {
                serial_number: new_serial,
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            });
        }
        let number = number + 1;
        let entries = revoked_certs.len();
        let crl = self.sign_crl(now, revoked_certs, number, days)?;
        Ok(Crl {
            pem: crl.pem()?,
            number,
            entries,
            already_listed,
            next_update: now + Duration::days(i64::from(days.max(1))),
        })
    }

    /// A CRL of `revoked_certs` numbered `number`, issued `now`, due again in `days` (at least
    /// one).
    fn sign_crl(
        &self,
        now: OffsetDateTime,
        revoked_certs: Vec<RevokedCertParams>,
        number: u64,
        days: u32,
    ) -> Result<rcgen::CertificateRevocationList, Error> {
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::days(i64::from(days.max(1))),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(self.issuer())?)
    }
}

/// The serial of a PEM certificate, raw bytes (for [`Ca::revoke`]).
///
/// # Errors
///
/// [`Error::InvalidCertificate`] when the text holds no certificate that parses.
pub fn serial_of(cert_pem: &str) -> Result<Vec<u8>, Error> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| Error::InvalidCertificate(e.to_string()))?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| Error::InvalidCertificate(e.to_string()))?;
    Ok(cert.raw_serial().to_vec())
}

/// A serial written as hex, with or without colons (as `relay-certs show` prints it).
///
/// # Errors
///
/// When it is not hex or is empty.
pub fn parse_serial(text: &str) -> Result<Vec<u8>, String> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    if hex.is_empty() || !hex.len().is_multiple_of(2) || hex.len() > 42 {
        return Err(format!("{text:?} is not a serial number in hex"));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{text:?} is not a serial number in hex"))
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::UnixTime;

    use super::*;
    use crate::{Leaf, Role, TrustAnchors, load};

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn revoking_appends_numbers_and_refuses_at_the_verifier() {
        let ca = Ca::generate("relay CA", 30).unwrap();
        let a = ca.issue(&Leaf::new(Role::Agent, "site-a", 1)).unwrap();
        let b = ca.issue(&Leaf::new(Role::Agent, "site-b", 1)).unwrap();
        let c = ca.issue(&Leaf::new(Role::Agent, "site-c", 1)).unwrap();

        let first = ca
            .revoke(None, &serial_of(&a.cert_pem).unwrap(), 30)
            .unwrap();
        assert_eq!((first.number, first.entries), (1, 1));
        let second = ca
            .revoke(Some(&first.pem), &serial_of(&b.cert_pem).unwrap(), 30)
            .unwrap();
        assert_eq!((second.number, second.entries), (2, 2));
        let again = ca
            .revoke(Some(&second.pem), &serial_of(&b.cert_pem).unwrap(), 30)
            .unwrap();
        assert!(again.already_listed);
        assert_eq!((again.number, again.entries), (3, 2));

        let revocation =
            Revocation::from_pem(again.pem.as_bytes(), ca.cert_pem().as_bytes(), "crl.pem")
                .unwrap();
        let info = |pem: &str| CertInfo::from_pem(pem).unwrap();
        assert!(revocation.is_revoked(&info(&a.cert_pem)));
        assert!(revocation.is_revoked(&info(&b.cert_pem)));
        assert!(!revocation.is_revoked(&info(&c.cert_pem)));

        let anchors = TrustAnchors::from_pem(ca.cert_pem(), "ca.pem").unwrap();
        let verifier = load::client_verifier(&anchors, &revocation).unwrap();
        let refused = verifier
            .verify_client_cert(&der(&b.cert_pem), &[], UnixTime::now())
            .unwrap_err()
            .to_string();
        assert!(refused.contains("Revoked"), "{refused}");
        assert_eq!(crate::presented_subject(&refused), Some("CN=site-b"));
        verifier
            .verify_client_cert(&der(&c.cert_pem), &[], UnixTime::now())
            .unwrap();
    }

    #[test]
    fn an_empty_crl_revokes_nothing_and_revoking_continues_its_numbers() {
        let ca = Ca::generate("relay CA", 30).unwrap();
        let empty = ca.empty_crl(30).unwrap();
        let revocation =
            Revocation::from_pem(empty.as_bytes(), ca.cert_pem().as_bytes(), "crl.pem").unwrap();
        assert!(revocation.is_empty());
        let a = ca.issue(&Leaf::new(Role::Agent, "site-a", 1)).unwrap();
        let next = ca
            .revoke(Some(&empty), &serial_of(&a.cert_pem).unwrap(), 30)
            .unwrap();
        assert_eq!((next.number, next.entries), (2, 1));
    }

    #[test]
    fn a_crl_of_another_ca_or_garbage_is_refused() {
        let ours = Ca::generate("relay CA", 30).unwrap();
        let theirs = Ca::generate("relay CA", 30).unwrap();
        let leaf = theirs.issue(&Leaf::new(Role::Agent, "x", 1)).unwrap();
        let foreign = theirs
            .revoke(None, &serial_of(&leaf.cert_pem).unwrap(), 30)
            .unwrap();
        let error = Revocation::from_pem(
            foreign.pem.as_bytes(),
            ours.cert_pem().as_bytes(),
            "crl.pem",
        )
        .unwrap_err()
        .to_string();
        assert!(error.starts_with("crl.pem: "), "{error}");
        assert!(error.contains("not signed by a CA"), "{error}");
        let error = Revocation::from_pem(b"nothing here", ours.cert_pem().as_bytes(), "crl.pem")
            .unwrap_err()
            .to_string();
        assert!(error.contains("no CRL found"), "{error}");
    }

    #[test]
    fn an_issuing_cas_list_with_its_certificate_is_used_under_the_root_alone() {
        let root = Ca::generate("relay root", 30).unwrap();
        let issuer = Ca::generate_issuer(&root, "relay issuer", 30).unwrap();
        let leaf = issuer.issue(&Leaf::new(Role::Agent, "site-a", 1)).unwrap();
        let crl = issuer
            .revoke(None, &serial_of(&leaf.cert_pem).unwrap(), 30)
            .unwrap();
        let root_pem = root.cert_pem().as_bytes();
        // The list alone: its signer is not in the CA file.
        let error = Revocation::from_pem(crl.pem.as_bytes(), root_pem, "crl.pem")
            .unwrap_err()
            .to_string();
        assert!(error.contains("not signed by a CA"), "{error}");
        // With the issuing CA's certificate after it, as relay-certs writes it.
        let file = format!("{}{}", crl.pem, issuer.cert_pem());
        let revocation = Revocation::from_pem(file.as_bytes(), root_pem, "crl.pem").unwrap();
        assert!(revocation.is_revoked(&CertInfo::from_pem(&leaf.cert_pem).unwrap()));
        let anchors = TrustAnchors::from_pem(root.cert_pem(), "ca.pem").unwrap();
        let verifier = load::client_verifier(&anchors, &revocation).unwrap();
        let refused = verifier
            .verify_client_cert(
                &der(&leaf.cert_pem),
                &[der(issuer.cert_pem())],
                UnixTime::now(),
            )
            .unwrap_err()
            .to_string();
        assert!(refused.contains("Revoked"), "{refused}");
        // An issuing CA of another root, appended, vouches for nothing.
        let other_root = Ca::generate("relay root", 30).unwrap();
        let other = Ca::generate_issuer(&other_root, "relay issuer", 30).unwrap();
        let stranger = other.issue(&Leaf::new(Role::Agent, "x", 1)).unwrap();
        let theirs = other
            .revoke(None, &serial_of(&stranger.cert_pem).unwrap(), 30)
            .unwrap();
        let file = format!("{}{}", theirs.pem, other.cert_pem());
        assert!(Revocation::from_pem(file.as_bytes(), root_pem, "crl.pem").is_err());
    }

    #[test]
    fn serials_parse_with_or_without_colons() {
        assert_eq!(parse_serial("0a:ff").unwrap(), vec![0x0a, 0xff]);
        assert_eq!(parse_serial("0aff").unwrap(), vec![0x0a, 0xff]);
        assert!(parse_serial("xyz").is_err());
        assert!(parse_serial("").is_err());
    }
}

//! The issuing CA the sink signs with (`--enroll-issuer DIR`, made by `relay-certs
//! init-issuer`), and the decisions of enrollment and renewal.
//!
//! The folder holds `issuer.pem` and `issuer.key` (the issuing CA), `ca.pem` (the root it is
//! signed by) and `tokens.log`, the ledger of the tokens used, which the sink writes (so the
//! folder must be writable by the sink's user). Enrolling:
//!
//! 1. the token's signature (by the issuing CA or the root), its time (5 minutes of clock
//!    skew either way), its role, and the root it names (this sink's);
//! 2. the signing request: its own signature, and nothing asked beyond an agent's name
//!    (`certs::request::read`), for the token's name;
//! 3. the ledger: a token is used by one key. The same key again gets a certificate again
//!    (the agent crashed before it stored the first); another key is refused;
//! 4. signed by the issuing CA for `--enroll-validity`, returned with the issuer's certificate
//!    and the root.
//!
//! Renewing signs a request for the name of the certificate the caller presented (its checks
//! are the service's): no token, no ledger.

use std::path::Path;
use std::sync::Mutex;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;
use tonic::Code;

/// How an enrollment or renewal request ended, as the `outcome` label and in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A certificate was issued.
    Issued,
    /// A certificate was issued again for a token its key had already used.
    Reissued,
    /// The token does not parse.
    MalformedToken,
    /// The token's signature does not verify with this sink's CAs (another CA's token, or
    /// altered).
    BadSignature,
    /// The token names another root CA than this sink's.
    OtherCa,
    /// The token's validity has ended.
    ExpiredToken,
    /// The token's validity has not begun (or a clock is wrong).
    TokenNotYetValid,
    /// The token is for another name than the request.
    NameMismatch,
    /// The signing request does not parse or asks for what is not given.
    BadRequest,
    /// The token was used by another key.
    UsedByAnotherKey,
    /// The ledger is full or cannot be written.
    LedgerUnavailable,
    /// Too many requests from the address.
    RateLimited,
    /// A renewal without a client certificate.
    NoCertificate,
    /// A renewal of a revoked certificate.
    Revoked,
    /// A renewal by an agent not on the allow-list.
    NotAllowed,
    /// The sink could not sign.
    Unavailable,
}

impl Outcome {
    pub(crate) const ALL: [Self; 16] = [
        Self::Issued,
        Self::Reissued,
        Self::MalformedToken,
        Self::BadSignature,
        Self::OtherCa,
        Self::ExpiredToken,
        Self::TokenNotYetValid,
        Self::NameMismatch,
        Self::BadRequest,
        Self::UsedByAnotherKey,
        Self::LedgerUnavailable,
        Self::RateLimited,
        Self::NoCertificate,
        Self::Revoked,
        Self::NotAllowed,
        Self::Unavailable,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Issued => "issued",
            Self::Reissued => "reissued",
            Self::MalformedToken => "malformed_token",
            Self::BadSignature => "bad_signature",
            Self::OtherCa => "other_ca",
            Self::ExpiredToken => "expired_token",
            Self::TokenNotYetValid => "token_not_yet_valid",
            Self::NameMismatch => "name_mismatch",
            Self::BadRequest => "bad_request",
            Self::UsedByAnotherKey => "used_by_another_key",
            Self::LedgerUnavailable => "ledger_unavailable",
            Self::RateLimited => "rate_limited",
            Self::NoCertificate => "no_certificate",
            Self::Revoked => "revoked",
            Self::NotAllowed => "not_allowed",
            Self::Unavailable => "unavailable",
        }
    }

    /// Whether `call` can end this way (the series created at 0 for it).
    pub(crate) fn applies_to(self, call: super::service::Call) -> bool {
        use super::service::Call;
        let token_only = matches!(
            self,
            Self::Reissued
                | Self::MalformedToken
                | Self::BadSignature
                | Self::OtherCa
                | Self::ExpiredToken
                | Self::TokenNotYetValid
                | Self::NameMismatch
                | Self::UsedByAnotherKey
                | Self::LedgerUnavailable
        );
        let renew_only = matches!(self, Self::NoCertificate | Self::Revoked | Self::NotAllowed);
        match call {
            Call::Enroll => !renew_only,
            Call::Renew => !token_only,
        }
    }

    /// The gRPC status of a refusal.
    pub(crate) fn code(self) -> Code {
        match self {
            Self::Issued | Self::Reissued => Code::Ok,
            Self::MalformedToken | Self::NameMismatch | Self::BadRequest => Code::InvalidArgument,
            Self::BadSignature
            | Self::OtherCa
            | Self::UsedByAnotherKey
            | Self::Revoked
            | Self::NotAllowed => Code::PermissionDenied,
            Self::ExpiredToken | Self::TokenNotYetValid | Self::NoCertificate => {
                Code::Unauthenticated
            }
            Self::RateLimited => Code::ResourceExhausted,
            Self::LedgerUnavailable | Self::Unavailable => Code::Unavailable,
        }
    }
}

/// A refused request: why, in words, and what is known of who asked.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) outcome: Outcome,
    pub(crate) message: String,
    /// The name asked for, when known.
    pub(crate) name: Option<String>,
    /// The token's id (hex), when it parsed.
    pub(crate) token_id: Option<String>,
}

impl Refusal {
    pub(crate) fn new(outcome: Outcome, message: impl Into<String>) -> Self {
        Self {
            outcome,
            message: message.into(),
            name: None,
            token_id: None,
        }
    }

    fn about(mut self, name: &str, token_id: Option<&str>) -> Self {
        self.name = Some(name.to_owned());
        self.token_id = token_id.map(str::to_owned);
        self
    }
}

/// A certificate issued.
#[derive(Debug)]
pub(crate) struct Granted {
    pub(crate) name: String,
    pub(crate) serial: String,
    pub(crate) token_id: Option<String>,
    /// Issued again for a token this key had used.
    pub(crate) again: bool,
    chain_pem: String,
    root_pem: String,
    not_after: OffsetDateTime,
}

impl Granted {
    pub(crate) fn outcome(&self) -> Outcome {
        if self.again {
            Outcome::Reissued
        } else {
            Outcome::Issued
        }
    }

    pub(crate) fn not_after_text(&self) -> String {
        certs::inspect::rfc3339(self.not_after)
    }

    pub(crate) fn into_issued(self) -> proto::enroll_pb::Issued {
        proto::enroll_pb::Issued {
            chain_pem: self.chain_pem,
            root_pem: self.root_pem,
            not_after_unix: self.not_after.unix_timestamp(),
        }
    }
}

/// The issuing CA, the root, and the ledger of tokens used.
pub(crate) struct Issuer {
    ca: certs::Ca,
    /// The issuing CA's subject, for the log.
    name: String,
    root_pem: String,
    root: CertificateDer<'static>,
    root_fingerprint: [u8; 32],
    /// The public keys a token may be signed with (issuer's, root's), SubjectPublicKeyInfo.
    token_keys: Vec<Vec<u8>>,
    ledger: Mutex<certs::token::Ledger>,
    /// Validity of the certificates issued.
    validity: std::time::Duration,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// Opens the issuing CA folder `dir`, certificates issued for `validity`.
    ///
    /// # Errors
    ///
    /// A file missing or unusable, or a ledger that cannot be read or written: the reason,
    /// naming the file.
    pub(crate) fn open(dir: &Path, validity: std::time::Duration) -> Result<Self, String> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "cannot read {} ({e}; make the folder with `relay-certs init-issuer`)",
                    path.display()
                )
            })
        };
        let root_pem = read("ca.pem")?;
        let root = CertificateDer::from_pem_slice(root_pem.as_bytes())
            .map_err(|e| format!("{}: no certificate ({e})", dir.join("ca.pem").display()))?;
        let ca = certs::Ca::load_dir(dir).map_err(|e| e.to_string())?;
        if !ca.is_issuer() {
            tracing::warn!(dir = %dir.display(), "--enroll-issuer is a root CA folder: the root's key is on the sink; an issuing CA (relay-certs init-issuer) lets it stay offline");
        }
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let token_keys = vec![
            certs::token::public_key_of(&ca_der).map_err(|e| e.to_string())?,
            certs::token::public_key_of(&root).map_err(|e| e.to_string())?,
        ];
        let name = certs::CertInfo::from_der(&ca_der)
            .map(|info| info.subject)
            .unwrap_or_default();
        let ledger_path = dir.join("tokens.log");
        let loaded = certs::token::Ledger::open(&ledger_path, OffsetDateTime::now_utc())
            .map_err(|e| e.to_string())?;
        for corrupt in &loaded.corrupt {
            tracing::warn!(ledger = %ledger_path.display(), reason = corrupt.reason.as_str(), lines = corrupt.lines, first_line = corrupt.first_line, "lines of the token ledger that do not read were skipped");
        }
        tracing::info!(ledger = %ledger_path.display(), live = loaded.live, expired = loaded.expired, "token ledger loaded");
        let ledger = loaded.ledger;
        Ok(Self {
            root_fingerprint: certs::token::fingerprint(&root),
            name,
            ca,
            root_pem,
            root,
            token_keys,
            ledger: Mutex::new(ledger),
            validity,
        })
    }

    /// The root CA certificate, PEM.
    pub(crate) fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root CA certificate (appended to the chain the enrollment port serves).
    pub(crate) fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The issuing CA's name, for the log.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Decides an enrollment: see the module's documentation.
    pub(crate) fn enroll(
        &self,
        token: &str,
        csr_der: &[u8],
        now: OffsetDateTime,
    ) -> Result<Granted, Refusal> {
        let keys: Vec<&[u8]> = self.token_keys.iter().map(Vec::as_slice).collect();
        let token =
            certs::token::verify(token, &keys, now, certs::token::SKEW).map_err(token_refusal)?;
        let id = token.id_hex();
        let refuse = |outcome, message: String| {
            Err(Refusal::new(outcome, message).about(&token.name, Some(&id)))
        };
        if token.root_fingerprint != self.root_fingerprint {
            return refuse(
                Outcome::OtherCa,
                format!(
                    "the token names another root CA ({}) than this sink's ({})",
                    certs::token::fingerprint_display(&token.root_fingerprint),
                    certs::token::fingerprint_display(&self.root_fingerprint)
                ),
            );
        }
        let requested = match certs::request::read(csr_der) {
            Ok(requested) => requested,
            Err(e) => return refuse(Outcome::BadRequest, e.to_string()),
        };
        if requested.name != token.name {
            return refuse(
                Outcome::NameMismatch,
                format!(
                    "the request is for {:?}, the token for {:?}",
                    requested.name, token.name
                ),
            );
        }
        let claim = self
            .ledger
            .lock()
            .expect("token ledger")
            .claim(&token, &requested.public_key_der);
        let again = match claim {
            Ok(certs::token::Claim::First) => false,
            Ok(certs::token::Claim::Again) => true,
            Err(certs::token::LedgerError::UsedByAnotherKey(_)) => {
                return refuse(
                    Outcome::UsedByAnotherKey,
                    "this token has been used by another key: a token is for one agent, once"
                        .into(),
                );
            }
            Err(e) => return refuse(Outcome::LedgerUnavailable, e.to_string()),
        };
        let mut granted = self
            .sign(requested)
            .map_err(|r| r.about(&token.name, Some(&id)))?;
        granted.token_id = Some(id);
        granted.again = again;
        Ok(granted)
    }

    /// Signs a renewal's request, which must be for `name`.
    pub(crate) fn renew(&self, name: &str, csr_der: &[u8]) -> Result<Granted, Refusal> {
        let requested = certs::request::read(csr_der)
            .map_err(|e| Refusal::new(Outcome::BadRequest, e.to_string()).about(name, None))?;
        if requested.name != name {
            return Err(Refusal::new(
                Outcome::NameMismatch,
                format!(
                    "the request is for {:?}, the certificate presented for {name:?}",
                    requested.name
                ),
            )
            .about(name, None));
        }
        self.sign(requested).map_err(|r| r.about(name, None))
    }

    /// Signs a request already read (and checked by the caller for its name).
    fn sign(&self, requested: certs::Requested) -> Result<Granted, Refusal> {
        let now = OffsetDateTime::now_utc();
        // Backdated a little for clocks behind ours, by at most a tenth of the lifetime.
        let validity = time::Duration::try_from(self.validity).unwrap_or(time::Duration::DAY);
        let backdate = (validity / 10_i32).min(time::Duration::minutes(5));
        let signed = self
            .ca
            .sign_requested(
                requested,
                certs::Validity::Between {
                    not_before: now - backdate,
                    not_after: now + validity,
                },
            )
            .map_err(|e| Refusal::new(Outcome::Unavailable, format!("cannot sign: {e}")))?;
        Ok(Granted {
            name: signed.name,
            serial: signed.serial,
            token_id: None,
            again: false,
            chain_pem: signed.chain_pem,
            root_pem: self.root_pem.clone(),
            not_after: signed.not_after,
        })
    }
}

/// A token refused by `certs::token::verify`, as an outcome.
fn token_refusal(error: certs::token::TokenError) -> Refusal {
    use certs::token::TokenError as E;
    let outcome = match &error {
        E::BadSignature => Outcome::BadSignature,
        E::Expired { .. } => Outcome::ExpiredToken,
        E::NotYetValid { .. } => Outcome::TokenNotYetValid,
        _ => Outcome::MalformedToken,
    };
    Refusal::new(outcome, error.to_string())
}

//! One-time enrollment tokens: the text an operator hands to a site so that its agent can
//! obtain one certificate from the sink's enrollment port, without any shared secret.
//!
//! # Format
//!
//! ```text
//! sfr1.<base64url, no padding: payload>.<base64url, no padding: signature>    (≤ 1,024 bytes)
//!
//! payload, big-endian:
//!   version u8 (= 1) | id [16] | role u8 (1 = agent) | not_before i64 | not_after i64
//!   | root_fingerprint [32] | name_len u8 (1..=64) | name (UTF-8)        no trailing bytes
//! ```
//!
//! Times are Unix seconds. `root_fingerprint` is the SHA-256 of the root CA certificate's DER:
//! the agent checks the sink's chain against it before it sends anything. The signature is
//! ECDSA P-256 with SHA-256 (ASN.1 DER) over `b"sflow-relay token v1\0"` followed by the
//! payload, by the key of the CA that minted the token (the issuing CA, or the root): the
//! context string keeps a token signature from ever being mistaken for a certificate or CRL
//! signature by the same key, or the other way round.
//!
//! [`parse`] reads a token without checking its signature (what the agent needs, and what the
//! fuzz target drives); [`verify`] checks the signature against the public keys it is given,
//! then the time with a clock skew allowance. Every refusal is a [`TokenError`] with a reason a
//! user can act on; no input panics. A token's single use is recorded by the [`Ledger`].
//!
//! Base64url is the `base64` crate's `URL_SAFE_NO_PAD` engine, which refuses padding and
//! non-canonical trailing bits, so one payload has exactly one text form.

mod ledger;

pub use ledger::{
    Claim, Corrupt, CorruptReason, Ledger, LedgerError, Loaded, MAX_LIVE, PRUNE_EVERY,
};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::SigningKey as _;
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::{Ca, Role};

/// What every token text starts with (format version 1).
pub const PREFIX: &str = "sfr1.";
/// The longest token text accepted, in bytes.
pub const MAX_TEXT_LEN: usize = 1024;
/// The payload version this build writes and reads.
pub const VERSION: u8 = 1;
/// The longest name a token carries, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// The lifetime of a token when none is given.
pub const DEFAULT_TTL: Duration = Duration::hours(1);
/// The longest lifetime a token may have.
pub const MAX_TTL: Duration = Duration::days(7);
/// The clock skew the sink allows on a token's times.
pub const SKEW: Duration = Duration::minutes(5);
/// What the signature covers before the payload.
pub const CONTEXT: &[u8] = b"sflow-relay token v1\0";
/// The role byte of an agent token (the only role tokens are minted for).
pub const ROLE_AGENT: u8 = 1;
/// Bounds of an ECDSA P-256 signature in ASN.1 DER (two INTEGERs of 1 to 33 bytes).
pub const SIGNATURE_LEN: std::ops::RangeInclusive<usize> = 8..=72;
/// The payload's size without the name.
pub const FIXED_PAYLOAD_LEN: usize = 1 + 16 + 1 + 8 + 8 + 32 + 1;

/// What a token allows: one certificate for `name`, in `role`, between the two times, from a
/// sink whose root CA has the fingerprint `root_fingerprint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// Random, unique: what the ledger records as used.
    pub id: [u8; 16],
    /// Always [`Role::Agent`] in format version 1.
    pub role: Role,
    /// The certificate's common name (the rules of `relay-certs issue --name`, 1 to 64 bytes).
    pub name: String,
    /// Start of validity (whole seconds).
    pub not_before: OffsetDateTime,
    /// End of validity (whole seconds).
    pub not_after: OffsetDateTime,
    /// SHA-256 of the root CA certificate's DER.
    pub root_fingerprint: [u8; 32],
}

/// The parts of a token text that the signature binds, as [`parse`] found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed<'a> {
    /// The base64url text of the payload, as given.
    pub payload_text: &'a str,
    /// The decoded payload.
    pub payload: Vec<u8>,
    /// The decoded signature (ASN.1 DER).
    pub signature: Vec<u8>,
}

/// Why a token was refused, or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The text is not a token of this format.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The payload has a version this build does not read.
    #[error("token format version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u8),
    /// The role byte is not agent's.
    #[error("token is for role {0}; tokens are only for agents (role {ROLE_AGENT})")]
    WrongRole(u8),
    /// No given key verifies the signature: altered, or signed by another CA.
    #[error(
        "token signature does not verify against this sink's issuing or root CA (altered, or \
         made by another CA)"
    )]
    BadSignature,
    /// The token's lifetime ended (beyond the clock skew allowance).
    #[error("token expired at {}", rfc3339(*not_after))]
    Expired {
        /// The end of its validity.
        not_after: OffsetDateTime,
    },
    /// The token's lifetime has not begun (beyond the clock skew allowance).
    #[error("token not valid before {} (check the clocks)", rfc3339(*not_before))]
    NotYetValid {
        /// The start of its validity.
        not_before: OffsetDateTime,
    },
    /// A name that a token cannot carry.
    #[error("name {name:?} cannot be put in a token: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A lifetime outside 1 second to 7 days.
    #[error("token lifetime {0} is refused: it must be from 1 second to 7 days")]
    InvalidTtl(Duration),
    /// The signing key cannot sign tokens (not ECDSA P-256), or signing failed.
    #[error("cannot sign the token: {0}")]
    Signing(String),
    /// A fingerprint text that is not `SHA256:` and 64 hex digits.
    #[error("{0:?} is not a fingerprint (expected SHA256: and 64 hex digits)")]
    InvalidFingerprint(String),
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

// === impl Token ===

impl Token {
    /// The id in lowercase hex (32 digits), as logs and the ledger write it.
    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }

    /// The binary payload of this token (what the signature covers, after [`CONTEXT`]).
    pub fn payload(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_PAYLOAD_LEN + self.name.len());
        out.push(VERSION);
        out.extend_from_slice(&self.id);
        // Tokens are minted for agents only; a sink token would be written as role 2, which
        // `parse` refuses (`TokenError::WrongRole`).
        out.push(match self.role {
            Role::Agent => ROLE_AGENT,
            Role::Sink => 2,
        });
        out.extend_from_slice(&self.not_before.unix_timestamp().to_be_bytes());
        out.extend_from_slice(&self.not_after.unix_timestamp().to_be_bytes());
        out.extend_from_slice(&self.root_fingerprint);
        // The name is at most 64 bytes once checked; a longer one is cut to fail parsing.
        out.push(u8::try_from(self.name.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(self.name.as_bytes());
        out
    }
}

/// The token text of `payload` and `signature`: [`PREFIX`], then both in base64url.
pub fn encode_text(payload: &[u8], signature: &[u8]) -> String {
    format!(
        "{PREFIX}{}.{}",
        URL_SAFE_NO_PAD.encode(payload),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// Checks a name against the rules of a certificate's name (`certs::request::check_name`: 1
/// to 64 bytes, no `/` or `\`, not starting with `.`, no control characters, no space at
/// either end), as a token's error.
///
/// # Errors
///
/// [`TokenError::InvalidName`] with the reason.
pub fn check_name(name: &str) -> Result<(), TokenError> {
    crate::request::check_name(name).map_err(|reason| TokenError::InvalidName {
        name: name.to_owned(),
        reason: format!("it {reason}"),
    })
}

/// Mints a token for an agent certificate named `name`, valid from now for `ttl`, signed by
/// `signer` (the issuing CA when there is one, else the root), for a sink whose root CA has
/// the fingerprint `root_fingerprint`.
///
/// # Errors
///
/// [`TokenError::InvalidName`], [`TokenError::InvalidTtl`] (under 1 second or over 7 days),
/// [`TokenError::Signing`] when the CA's key is not ECDSA P-256.
pub fn mint(
    signer: &Ca,
    root_fingerprint: [u8; 32],
    name: &str,
    ttl: Duration,
) -> Result<String, TokenError> {
    if ttl < Duration::seconds(1) || ttl > MAX_TTL {
        return Err(TokenError::InvalidTtl(ttl));
    }
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("0 is a valid nanosecond");
    mint_between(
        signer,
        root_fingerprint,
        name,
        now,
        now + Duration::seconds(ttl.whole_seconds()),
    )
}

/// [`mint`] with the token's times given (whole seconds are kept): for a token made ahead of
/// its use, and for tests of expiry.
///
/// # Errors
///
/// As [`mint`]; [`TokenError::InvalidTtl`] when `not_after - not_before` is under 1 second or
/// over 7 days.
pub fn mint_between(
    signer: &Ca,
    root_fingerprint: [u8; 32],
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<String, TokenError> {
    check_name(name)?;
    let whole = |t: OffsetDateTime| t.replace_nanosecond(0).expect("0 is a valid nanosecond");
    let (not_before, not_after) = (whole(not_before), whole(not_after));
    let ttl = not_after - not_before;
    if ttl < Duration::seconds(1) || ttl > MAX_TTL {
        return Err(TokenError::InvalidTtl(ttl));
    }
    let key = signer.issuer().key();
    if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(TokenError::Signing(
            "the CA key is not ECDSA P-256 (make the CA with relay-certs)".into(),
        ));
    }
    let token = Token {
        id: rand::random(),
        role: Role::Agent,
        name: name.to_owned(),
        not_before,
        not_after,
        root_fingerprint,
    };
    let payload = token.payload();
    let signature = key
        .sign(&[CONTEXT, &payload].concat())
        .map_err(|e| TokenError::Signing(e.to_string()))?;
    Ok(encode_text(&payload, &signature))
}

/// Reads a token text without checking its signature: the token, and the signed parts for
/// [`verify`].
///
/// # Errors
///
/// [`TokenError::Malformed`] with the reason (length, prefix, base64url, payload layout, name,
/// times), [`TokenError::UnsupportedVersion`], [`TokenError::WrongRole`].
pub fn parse(text: &str) -> Result<(Token, Signed<'_>), TokenError> {
    let malformed = |reason: String| Err(TokenError::Malformed(reason));
    if text.len() > MAX_TEXT_LEN {
        return malformed(format!(
            "{} bytes, over the limit of {MAX_TEXT_LEN}",
            text.len()
        ));
    }
    let Some(rest) = text.strip_prefix(PREFIX) else {
        return malformed(format!("does not start with {PREFIX:?}"));
    };
    let Some((payload_text, signature_text)) = rest.split_once('.') else {
        return malformed("no signature part (expected sfr1.PAYLOAD.SIGNATURE)".into());
    };
    let decode = |part: &str, what: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| TokenError::Malformed(format!("{what} is not base64url: {e}")))
    };
    let payload = decode(payload_text, "payload")?;
    let signature = decode(signature_text, "signature")?;
    if !SIGNATURE_LEN.contains(&signature.len()) {
        return malformed(format!(
            "signature of {} bytes (an ECDSA P-256 signature has 8 to 72)",
            signature.len()
        ));
    }
    let token = read_payload(&payload)?;
    let signed = Signed {
        payload_text,
        payload,
        signature,
    };
    Ok((token, signed))
}

/// Reads the binary payload (see the module's format).
fn read_payload(payload: &[u8]) -> Result<Token, TokenError> {
    let malformed = |reason: String| TokenError::Malformed(reason);
    let Some(&version) = payload.first() else {
        return Err(malformed("empty payload".into()));
    };
    if version != VERSION {
        return Err(TokenError::UnsupportedVersion(version));
    }
    if payload.len() < FIXED_PAYLOAD_LEN {
        return Err(malformed(format!(
            "payload of {} bytes is truncated (at least {} with a name)",
            payload.len(),
            FIXED_PAYLOAD_LEN + 1
        )));
    }
    let (fixed, name) = payload.split_at(FIXED_PAYLOAD_LEN);
    let role = fixed[17];
    if role != ROLE_AGENT {
        return Err(TokenError::WrongRole(role));
    }
    let name_len = usize::from(fixed[FIXED_PAYLOAD_LEN - 1]);
    if name.len() != name_len {
        return Err(malformed(format!(
            "the name is announced as {name_len} bytes, and {} follow",
            name.len()
        )));
    }
    let name = std::str::from_utf8(name)
        .map_err(|_| malformed("the name is not UTF-8".into()))?
        .to_owned();
    check_name(&name).map_err(|e| malformed(e.to_string()))?;
    let time = |at: usize, what: &str| {
        let secs = i64::from_be_bytes(fixed[at..at + 8].try_into().expect("8 bytes"));
        OffsetDateTime::from_unix_timestamp(secs)
            .map_err(|_| malformed(format!("{what} {secs} is out of range")))
    };
    let not_before = time(18, "not_before")?;
    let not_after = time(26, "not_after")?;
    let lifetime = not_after - not_before;
    if lifetime < Duration::seconds(1) || lifetime > MAX_TTL {
        return Err(malformed(format!(
            "lifetime of {lifetime} (from not_before to not_after) is not within 1 second to \
             7 days"
        )));
    }
    Ok(Token {
        id: fixed[1..17].try_into().expect("16 bytes"),
        role: Role::Agent,
        name,
        not_before,
        not_after,
        root_fingerprint: fixed[34..66].try_into().expect("32 bytes"),
    })
}

/// Reads a token and checks it: the signature by one of `keys` (SubjectPublicKeyInfo DER of
/// the issuing CA and the root), then `not_before - skew <= now <= not_after + skew`.
///
/// Whether the token was used before is the [`Ledger`]'s business, and whether its name and
/// fingerprint match a request and this sink is the caller's.
///
/// # Errors
///
/// What [`parse`] refuses, then [`TokenError::BadSignature`], [`TokenError::NotYetValid`] or
/// [`TokenError::Expired`].
pub fn verify(
    text: &str,
    keys: &[&[u8]],
    now: OffsetDateTime,
    skew: Duration,
) -> Result<Token, TokenError> {
    let (token, signed) = parse(text)?;
    let message = [CONTEXT, &signed.payload].concat();
    let verified = keys.iter().any(|spki| {
        ec_point(spki).is_some_and(|point| {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &point)
                .verify(&message, &signed.signature)
                .is_ok()
        })
    });
    if !verified {
        return Err(TokenError::BadSignature);
    }
    if now < token.not_before - skew {
        return Err(TokenError::NotYetValid {
            not_before: token.not_before,
        });
    }
    if now > token.not_after + skew {
        return Err(TokenError::Expired {
            not_after: token.not_after,
        });
    }
    Ok(token)
}

/// The raw public key (the EC point) inside a SubjectPublicKeyInfo, or `None` when it does not
/// parse.
fn ec_point(spki: &[u8]) -> Option<Vec<u8>> {
    match SubjectPublicKeyInfo::from_der(spki) {
        Ok(([], info)) => Some(info.subject_public_key.data.to_vec()),
        _ => None,
    }
}

/// The SubjectPublicKeyInfo (DER) of a certificate (DER): what [`verify`] takes as a key.
///
/// # Errors
///
/// When the certificate does not parse.
pub fn public_key_of(cert_der: &[u8]) -> Result<Vec<u8>, crate::Error> {
    let (_, cert) = x509_parser::prelude::X509Certificate::from_der(cert_der)
        .map_err(|e| crate::Error::InvalidCertificate(e.to_string()))?;
    Ok(cert.public_key().raw.to_vec())
}

/// SHA-256 of a certificate's DER: what a token binds, and what `sha256sum` of the DER prints.
pub fn fingerprint(cert_der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The display form of a fingerprint: `SHA256:` and 64 lowercase hex digits.
pub fn fingerprint_display(fingerprint: &[u8; 32]) -> String {
    format!("SHA256:{}", hex(fingerprint))
}

/// Reads the display form back (`SHA256:` or `sha256:`, then 64 hex digits of either case).
///
/// # Errors
///
/// [`TokenError::InvalidFingerprint`].
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], TokenError> {
    let invalid = || TokenError::InvalidFingerprint(text.to_owned());
    let digits = text
        .strip_prefix("SHA256:")
        .or_else(|| text.strip_prefix("sha256:"))
        .ok_or_else(invalid)?;
    if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| invalid())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| invalid())?;
    }
    Ok(out)
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests;

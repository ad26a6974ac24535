//! Identity for sflow-relay: a private CA, the certificates it issues, and the one place where
//! the mutual-TLS policy of agent and sink is written down.
//!
//! - [`issue`] — make a CA and sign agent (clientAuth) and sink (serverAuth) certificates with
//!   rcgen. Used by the `relay-certs` binary and by tests that need a throwaway PKI.
//! - [`load`] — read PEM files and build the rustls [`rustls::ServerConfig`] (sink: TLS 1.3
//!   only, a client certificate chaining to the CA required, no 0-RTT) and
//!   [`rustls::ClientConfig`] (agent: the sink verified against the CA and the configured name).
//! - [`inspect`] — read a certificate's subject, names, usage and validity, for `relay-certs
//!   show` and for naming a peer in logs.
//! - [`reload`] — re-read the three PEM files of an agent or sink (CA, certificate, key), check
//!   them as a set and hand back what changed, for certificate rotation without a restart.
//! - [`refusal`] — the subject of a refused client certificate, carried in the handshake
//!   error's text so the sink can log who was refused ([`presented_subject`]).
//! - [`revocation`] — certificate revocation lists: signing them (`relay-certs revoke`) and
//!   reading them for the sink's verifier ([`Revocation`]).
//! - [`enroll_tls`] — the TLS of the enrollment port: the sink's chain with its root, and
//!   the enrolling agent's trust in the one root a token names by fingerprint.
//! - [`request`] — certificate signing requests: made at the site with its key, checked and
//!   signed at the CA ([`Ca::sign_request`]), so private keys never travel.
//! - [`store`] — writing PEM files (keys with mode 0600, no overwriting without `--force`).
//! - [`token`] — one-time enrollment tokens (`sfr1.…`): minting, parsing, verifying, the
//!   root fingerprint they bind, and the [`Ledger`] of used ones.
//!
//! Nothing here opens a socket: the QUIC and gRPC layers take the configs built here.
#![warn(missing_docs)]

pub mod enroll_tls;
pub mod inspect;
pub mod issue;
pub mod load;
pub mod refusal;
pub mod reload;
pub mod request;
pub mod revocation;
pub mod store;
#[cfg(test)]
mod testing;
pub mod token;

pub use inspect::CertInfo;
pub use issue::{Ca, Issued, Leaf, Role};
pub use load::{Identity, TrustAnchors, client_config, server_config, server_config_with_crls};
pub use refusal::{Refusal, presented_subject};
pub use reload::{Loaded, Reloader, TlsFiles, check_chain};
pub use request::{Request, Requested, Signed, Validity};
pub use revocation::Revocation;
pub use token::{Claim, Ledger, LedgerError, Token, TokenError};

use std::path::PathBuf;

/// Errors from issuing, reading or using certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds no certificate.
    #[error("{0}: no certificate found (expected a PEM \"CERTIFICATE\" block)")]
    NoCertificate(String),
    /// A PEM file holds no private key, or one that cannot be parsed.
    #[error("{0}: no usable private key found (expected a PEM \"PRIVATE KEY\" block): {1}")]
    NoPrivateKey(String, String),
    /// A certificate could not be parsed as X.509.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// A certificate file holds a certificate that cannot be used: not X.509, or not
    /// acceptable as a trust anchor.
    #[error("{origin}: unusable certificate: {reason}")]
    UnusableCertificate {
        /// The file (or other source) it came from.
        origin: String,
        /// Why, in the parser's words.
        reason: String,
    },
    /// The private key is not the one the certificate was issued for.
    #[error("{key} does not match certificate {cert}")]
    KeyMismatch {
        /// The key file.
        key: String,
        /// The certificate file.
        cert: String,
    },
    /// The certificate's validity period has ended.
    #[error("{origin}: certificate expired at {not_after}")]
    Expired {
        /// The certificate file.
        origin: String,
        /// Its end of validity (RFC 3339).
        not_after: String,
    },
    /// The certificate's validity period has not begun (or the clock is wrong).
    #[error("{origin}: certificate not valid before {not_before}")]
    NotYetValid {
        /// The certificate file.
        origin: String,
        /// Its start of validity (RFC 3339).
        not_before: String,
    },
    /// The certificate does not chain to the CA, or is not for this role (a sink certificate
    /// given to an agent, say).
    #[error("{cert}: not a valid {role} certificate under the CA in {ca}: {reason}")]
    Untrusted {
        /// The certificate file.
        cert: String,
        /// The CA file.
        ca: String,
        /// `"agent"` or `"sink"`.
        role: &'static str,
        /// rustls's reason.
        reason: String,
    },
    /// rustls refused the configuration (for example a key that does not match the certificate).
    #[error("TLS configuration refused: {0}")]
    Tls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built (for example an empty CA file).
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A name given for a DNS subject alternative name is not a valid DNS name.
    #[error("{0:?} is not a valid DNS name")]
    InvalidName(String),
    /// A certificate revocation list cannot be used: it does not parse, or no CA of the CA
    /// file signed it.
    #[error("{origin}: unusable certificate revocation list: {reason}")]
    Crl {
        /// The CRL file (or other source).
        origin: String,
        /// Why.
        reason: String,
    },
    /// rcgen could not make or sign a certificate.
    #[error("cannot make certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

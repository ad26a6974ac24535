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
//! - [`store`] — writing PEM files (keys with mode 0600, no overwriting without `--force`).
//!
//! Nothing here opens a socket: the QUIC and gRPC layers take the configs built here.
#![warn(missing_docs)]

pub mod inspect;
pub mod issue;
pub mod load;
pub mod store;

pub use inspect::CertInfo;
pub use issue::{Ca, Issued, Leaf, Role};
pub use load::{Identity, TrustAnchors, client_config, server_config};

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
    /// rustls refused the configuration (for example a key that does not match the certificate).
    #[error("TLS configuration refused: {0}")]
    Tls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built (for example an empty CA file).
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A name given for a DNS subject alternative name is not a valid DNS name.
    #[error("{0:?} is not a valid DNS name")]
    InvalidName(String),
    /// rcgen could not make or sign a certificate.
    #[error("cannot make certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

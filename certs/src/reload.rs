//! Re-reading an agent's or a sink's certificate files while it runs, for rotation without a
//! restart.
//!
//! An agent or a sink has three PEM files ([`TlsFiles`]): the CA it trusts, its certificate
//! (chain) and its private key. A [`Reloader`] re-reads them when asked and checks them as a
//! set before anything is replaced:
//!
//! - the CA file holds at least one usable certificate;
//! - the certificate file holds a certificate and the key file a private key;
//! - the key is the certificate's;
//! - the certificate is within its validity period now (an expired or not-yet-valid
//!   replacement is refused);
//! - the certificate chains to the CA and carries the usage of its role (clientAuth for an
//!   agent, serverAuth for a sink) — unless turned off with [`Reloader::without_chain_check`]
//!   for deployments whose agents and sinks have different CAs.
//!
//! On success the caller gets a [`Loaded`] and builds its new configs with
//! [`server_config`](crate::server_config) or [`client_config`](crate::client_config); on
//! failure it keeps the configs it has and logs the error, which names the file and the reason.
//!
//! # Change detection
//!
//! [`Reloader::check`] compares the bytes of the three files with those it read last time, and
//! only a change is checked and reported, once: a bad file is reported at the check that first
//! sees it, not at every poll. Comparing contents rather than modification times covers the
//! ways files get replaced:
//!
//! - in place, one file after the other: a check between the two sees a certificate without
//!   its key and refuses it; the next check sees both and accepts them;
//! - by renaming into place, or through a symlink swapped atomically (Kubernetes secret
//!   volumes): the paths are re-read each time, so they are followed to the new files.
//!
//! Whatever mixture of old and new files one check may read, the next check after the writer
//! has finished reads the final set, which differs from the mixture, and checks it.
//!
//! What this deliberately does not do: wait, poll, watch files or handle signals (the caller
//! runs a loop and calls [`Reloader::check`], or [`Reloader::force`] on SIGHUP), keep the
//! configs in use, or warn of a certificate nearing its expiry (that is a metric).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, pki_types::CertificateDer};
use time::OffsetDateTime;

use crate::inspect::rfc3339;
use crate::{Error, Identity, Role, TrustAnchors, load};

/// The three PEM files of an agent or a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) the peer must chain to.
    pub ca: PathBuf,
    /// This end's certificate, leaf first, then any intermediates.
    pub cert: PathBuf,
    /// This end's private key.
    pub key: PathBuf,
}

/// A checked set: what [`server_config`](crate::server_config) and
/// [`client_config`](crate::client_config) take.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The CA the peer must chain to.
    pub ca: TrustAnchors,
    /// This end's certificate and key; [`Identity::info`] tells the new subject and expiry.
    pub identity: Identity,
}

/// Re-reads a [`TlsFiles`] set and checks it; see the [module docs](self).
pub struct Reloader {
    files: TlsFiles,
    role: Role,
    chain_check: bool,
    /// The files' contents (or why they could not be read) at the last check.
    seen: Option<Contents>,
}

/// The bytes of CA, certificate and key, or why each could not be read.
type Contents = [Result<Vec<u8>, ReadFailure>; 3];

/// Why a file could not be read, comparable with the last time (`io::Error` is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadFailure {
    kind: io::ErrorKind,
    os_error: Option<i32>,
}

// === impl Reloader ===

impl Reloader {
    /// A reloader for the files of an agent ([`Role::Agent`]) or a sink ([`Role::Sink`]).
    ///
    /// It has read nothing yet: the first [`check`](Self::check) loads the files, so does
    /// [`force`](Self::force), which suits start-up.
    pub fn new(files: TlsFiles, role: Role) -> Self {
        Self {
            files,
            role,
            chain_check: true,
            seen: None,
        }
    }

    /// Loads the set at start-up: checked in full, or, when the certificate does not chain to
    /// the CA file (agents and sinks with CAs of their own), without the chain check, which
    /// later reloads then skip too. The `bool` says whether the chain is checked.
    ///
    /// # Errors
    ///
    /// As [`force`](Self::force), for anything but the chain.
    pub fn open(files: TlsFiles, role: Role) -> Result<(Self, Loaded, bool), Error> {
        let mut reloader = Self::new(files.clone(), role);
        match reloader.force() {
            Ok(loaded) => Ok((reloader, loaded, true)),
            Err(Error::Untrusted { .. }) => {
                let mut reloader = Self::new(files, role).without_chain_check();
                let loaded = reloader.force()?;
                Ok((reloader, loaded, false))
            }
            Err(e) => Err(e),
        }
    }

    /// Does not check that the certificate chains to the CA file (nor its usage), for
    /// deployments where this end's certificate is issued by another CA than the one it
    /// verifies its peers with. The key, the validity period and the parsing are still checked.
    #[must_use]
    pub fn without_chain_check(mut self) -> Self {
        self.chain_check = false;
        self
    }

    /// The files this reloader reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Re-reads the files and checks them if any has changed since the last check (or force).
    ///
    /// - `Ok(None)`: unchanged, whether what was read last time was accepted or refused.
    /// - `Ok(Some(_))`: changed, and the new set passed every check: switch to it.
    /// - `Err(_)`: changed, and the new set is refused; keep the configs in use. The error
    ///   names the file and the reason, for the log line. It is returned once: the next check
    ///   of the same contents returns `Ok(None)`.
    ///
    /// # Errors
    ///
    /// [`Error::Read`], [`Error::NoCertificate`], [`Error::NoPrivateKey`],
    /// [`Error::UnusableCertificate`], [`Error::KeyMismatch`], [`Error::Expired`],
    /// [`Error::NotYetValid`] or [`Error::Untrusted`], as described above.
    pub fn check(&mut self) -> Result<Option<Loaded>, Error> {
        let contents = self.read();
        if self.seen.as_ref() == Some(&contents) {
            return Ok(None);
        }
        let result = self.validate(&contents);
        self.seen = Some(contents);
        result.map(Some)
    }

    /// Re-reads and checks the files whether or not they changed: for start-up, and for
    /// SIGHUP, where an operator expects an answer (the set loaded again, or why not) even if
    /// nothing changed. The time checks are made afresh too, so a certificate that has expired
    /// in place is reported. Later [`check`](Self::check)s compare with what this read.
    ///
    /// # Errors
    ///
    /// As [`check`](Self::check), for the set as it is now.
    pub fn force(&mut self) -> Result<Loaded, Error> {
        let contents = self.read();
        let result = self.validate(&contents);
        self.seen = Some(contents);
        result
    }

    fn read(&self) -> Contents {
        [&self.files.ca, &self.files.cert, &self.files.key].map(|path| {
            std::fs::read(path).map_err(|e| ReadFailure {
                kind: e.kind(),
                os_error: e.raw_os_error(),
            })
        })
    }

    fn validate(&self, contents: &Contents) -> Result<Loaded, Error> {
        let [ca, cert, key] = contents;
        let ca = read_result(ca, &self.files.ca)?;
        let cert = read_result(cert, &self.files.cert)?;
        let key = read_result(key, &self.files.key)?;
        let (ca_origin, cert_origin) = (origin(&self.files.ca), origin(&self.files.cert));
        let ca = TrustAnchors::from_pem_bytes(ca, &ca_origin)?;
        let identity = Identity::from_pem_bytes(cert, key, &cert_origin, &origin(&self.files.key))?;

        let info = identity.info();
        let now = OffsetDateTime::now_utc();
        if now > info.not_after {
            return Err(Error::Expired {
                origin: cert_origin,
                not_after: rfc3339(info.not_after),
            });
        }
        if now < info.not_before {
            return Err(Error::NotYetValid {
                origin: cert_origin,
                not_before: rfc3339(info.not_before),
            });
        }
        if self.chain_check {
            verify_chain(&ca, identity.chain(), self.role).map_err(|e| match e {
                Error::Tls(reason) => Error::Untrusted {
                    cert: cert_origin,
                    ca: ca_origin,
                    role: self.role.as_str(),
                    reason: load::certificate_reason(&reason),
                },
                other => other,
            })?;
        }
        Ok(Loaded { ca, identity })
    }
}

/// Not derived: the contents include the private key.
impl fmt::Debug for Reloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloader")
            .field("files", &self.files)
            .field("role", &self.role)
            .field("chain_check", &self.chain_check)
            .finish_non_exhaustive()
    }
}

/// Checks that `identity`'s chain leads to `ca` with the usage of `role`, as the peer of that
/// end would (except for a sink's name, which its peers check against the name they dialled).
///
/// # Errors
///
/// rustls's reason when it does not.
pub fn check_chain(ca: &TrustAnchors, identity: &Identity, role: Role) -> Result<(), Error> {
    verify_chain(ca, identity.chain(), role)
}

/// Verifies `chain` as the peer of this end would, except for the name (a sink's peers verify
/// the name they dialled, which is theirs to know).
fn verify_chain(
    ca: &TrustAnchors,
    chain: &[CertificateDer<'static>],
    role: Role,
) -> Result<(), Error> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(rustls::Error::NoCertificatesPresented.into());
    };
    let now = UnixTime::now();
    match role {
        Role::Agent => {
            WebPkiClientVerifier::builder_with_provider(ca.roots(), load::provider())
                .build()?
                .verify_client_cert(leaf, intermediates, now)?;
        }
        Role::Sink => {
            let verifier =
                WebPkiServerVerifier::builder_with_provider(ca.roots(), load::provider())
                    .build()?;
            // webpki checks the name last, after the chain and the usage: a name mismatch
            // means everything else passed.
            let any_name = ServerName::from(std::net::IpAddr::from([0, 0, 0, 0]));
            match verifier.verify_server_cert(leaf, intermediates, &any_name, &[], now) {
                Ok(_)
                | Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

fn read_result<'a>(
    result: &'a Result<Vec<u8>, ReadFailure>,
    path: &Path,
) -> Result<&'a [u8], Error> {
    result.as_deref().map_err(|failure| Error::Read {
        path: path.to_owned(),
        source: match failure.os_error {
            Some(code) => io::Error::from_raw_os_error(code),
            None => failure.kind.into(),
        },
    })
}

fn origin(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests;

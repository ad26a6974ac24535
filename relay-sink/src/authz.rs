//! Authorization beyond "signed by our CA": which agent identities may connect
//! (`--allowed-agents`), which certificates are revoked (`--crl`), and how many connections
//! one identity may hold open (`--max-connections-per-agent`).
//!
//! - A revoked certificate is refused by webpki during the TLS handshake (the CRLs are in the
//!   verifier, built in `relay-certs`); [`Policy::check`] repeats the check on the serials so
//!   that a reload can close the connections of an agent revoked while connected.
//! - The allow-list is checked once the handshake has authenticated the agent: the name it is
//!   checked by is the one the CA vouches for, never a claim.
//! - The per-identity limit is counted where connections are registered (`status::Agents`), in
//!   the same lock that adds the connection, so two racing connections cannot both be the
//!   last one allowed.
//!
//! The files are re-read with the certificates (SIGHUP, `--cert-reload-interval`) and checked
//! before use: a CRL must be signed by a CA of the CA file, an allow-list must be readable. A
//! bad file is refused, logged, and the lists in use stay.
//!
//! A CRL file that does not exist yet is not an error: a deployment can name `--crl` before
//! anything is revoked (`relay-certs init` writes an empty list, but the sink may start before
//! it is copied over). The sink warns once, revokes nothing, and loads the list when it
//! appears. Once a list has been loaded, its disappearance is an error like any other bad
//! file: the list in use stays, so deleting the file never un-revokes an agent.
//!
//! What this deliberately does not do: authorise per destination or per sFlow source (every
//! accepted agent's datagrams are replayed alike), or match names by pattern (a list of exact
//! names is easy to audit).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::labels::RefusalKind;

/// The authorization in force: replaced whole on reload.
#[derive(Debug, Default)]
pub(crate) struct Policy {
    /// The names allowed; `None` when any agent of the CA is.
    allowed: Option<HashSet<String>>,
    /// The CRLs and the serials they list.
    pub(crate) revocation: certs::Revocation,
}

impl Policy {
    /// Whether `agent` (the name in its certificate, described by `cert`) may be connected:
    /// `Err` with the reason when not.
    pub(crate) fn check(
        &self,
        agent: &str,
        cert: Option<&certs::CertInfo>,
    ) -> Result<(), RefusalKind> {
        if cert.is_some_and(|info| self.revocation.is_revoked(info)) {
            return Err(RefusalKind::Revoked);
        }
        match &self.allowed {
            Some(allowed) if !allowed.contains(agent) => Err(RefusalKind::NotAllowed),
            _ => Ok(()),
        }
    }

    /// Agents on the allow-list (`None`: no list), for the log.
    pub(crate) fn allowed_count(&self) -> Option<usize> {
        self.allowed.as_ref().map(HashSet::len)
    }
}

/// The allow-list and CRL files, re-read and checked on demand (with the CA file, which
/// checks the CRL's signature).
#[derive(Debug)]
pub(crate) struct PolicyFiles {
    ca: PathBuf,
    crl: Option<PathBuf>,
    allowed: Option<PathBuf>,
    /// The contents at the last check.
    seen: Option<Contents>,
    /// Whether a CRL has been loaded from `crl` (after which a missing file is an error).
    crl_loaded: bool,
    /// Whether the missing CRL file has been warned about.
    crl_missing_warned: bool,
}

/// What was read of the CA, CRL and allow-list files: `None` for a file not configured, the
/// bytes, or why they could not be read.
type Contents = [Option<Result<Vec<u8>, ReadError>>; 3];

/// Why the allow-list or the revocation list cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PolicyError {
    /// A file could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The CRL does not parse, or is not signed by a CA of the CA file.
    #[error(transparent)]
    Crl(#[from] certs::Error),
}

/// A policy file that could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot read {}: {source}", path.display())]
pub(crate) struct ReadError {
    path: PathBuf,
    source: Arc<std::io::Error>,
}

/// Read again, the same failure is not news: equal when the same file fails the same way.
impl PartialEq for ReadError {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
            && self.source.kind() == other.source.kind()
            && self.source.raw_os_error() == other.source.raw_os_error()
    }
}

impl PolicyFiles {
    pub(crate) fn new(ca: PathBuf, crl: Option<PathBuf>, allowed: Option<PathBuf>) -> Self {
        Self {
            ca,
            crl,
            allowed,
            seen: None,
            crl_loaded: false,
            crl_missing_warned: false,
        }
    }

    /// Whether there is anything to read (else the policy is the default: everyone, nothing
    /// revoked).
    pub(crate) fn any(&self) -> bool {
        self.crl.is_some() || self.allowed.is_some()
    }

    /// Re-reads the files; `Ok(None)` when unchanged since the last check (unless `force`),
    /// `Ok(Some)` with the new policy, `Err` naming the file and the reason (once per
    /// change, as the certificate reloader does).
    pub(crate) fn check(&mut self, force: bool) -> Result<Option<Policy>, PolicyError> {
        if !self.any() {
            return Ok(None);
        }
        let read = |path: Option<&Path>| {
            path.map(|p| {
                std::fs::read(p).map_err(|e| ReadError {
                    path: p.to_owned(),
                    source: Arc::new(e),
                })
            })
        };
        let contents = [
            read(self.crl.is_some().then_some(self.ca.as_path())),
            read(self.crl.as_deref()),
            read(self.allowed.as_deref()),
        ];
        if !force && self.seen.as_ref() == Some(&contents) {
            return Ok(None);
        }
        let result = self.parse(&contents);
        self.seen = Some(contents);
        let (policy, crl) = result?;
        match crl {
            CrlState::Loaded => self.crl_loaded = true,
            CrlState::NotYet(path) if !self.crl_missing_warned => {
                self.crl_missing_warned = true;
                tracing::warn!(crl = %path.display(), "revocation list not found: nothing is revoked until it appears (checked with the certificates)");
            }
            CrlState::NotYet(_) | CrlState::None => {}
        }
        Ok(Some(policy))
    }

    fn parse(&self, contents: &Contents) -> Result<(Policy, CrlState), PolicyError> {
        let [ca, crl, allowed] = contents;
        let (revocation, state) = match (ca, crl, &self.crl) {
            (_, Some(Err(missing)), Some(path)) if missing.not_found() && !self.crl_loaded => {
                (certs::Revocation::none(), CrlState::NotYet(path.clone()))
            }
            (Some(ca), Some(crl), Some(path)) => {
                let (ca, crl) = (
                    ca.as_ref().map_err(Clone::clone)?,
                    crl.as_ref().map_err(Clone::clone)?,
                );
                let revocation = certs::Revocation::from_pem(crl, ca, &path.display().to_string())?;
                (revocation, CrlState::Loaded)
            }
            _ => (certs::Revocation::none(), CrlState::None),
        };
        let allowed = match allowed {
            Some(text) => Some(parse_allow_list(text.as_ref().map_err(Clone::clone)?)),
            None => None,
        };
        Ok((
            Policy {
                allowed,
                revocation,
            },
            state,
        ))
    }
}

/// What became of the CRL file at a check.
enum CrlState {
    /// None configured.
    None,
    /// Configured, and does not exist yet (none loaded before).
    NotYet(PathBuf),
    /// Read and checked.
    Loaded,
}

impl ReadError {
    /// Whether the file does not exist.
    fn not_found(&self) -> bool {
        self.source.kind() == std::io::ErrorKind::NotFound
    }
}

/// One name per line, as in the agent's certificate (`relay-certs issue --name`); blank lines
/// and `#` comments ignored, spaces around a name trimmed.
fn parse_allow_list(text: &[u8]) -> HashSet<String> {
    String::from_utf8_lossy(text)
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_lines() {
        let list = parse_allow_list(b"# sites\nsite-a\n  site-b  # Paris\n\n#site-c\n");
        assert_eq!(list.len(), 2);
        assert!(list.contains("site-a") && list.contains("site-b"));
    }

    #[test]
    fn without_files_everyone_is_allowed() {
        let policy = Policy::default();
        assert_eq!(policy.check("anyone", None), Ok(()));
        let listed = Policy {
            allowed: Some(parse_allow_list(b"site-a")),
            revocation: certs::Revocation::none(),
        };
        assert_eq!(listed.check("site-a", None), Ok(()));
        assert_eq!(listed.check("site-b", None), Err(RefusalKind::NotAllowed));
    }

    #[test]
    fn a_crl_may_appear_later_but_once_loaded_its_loss_keeps_it() {
        let dir = std::env::temp_dir().join(format!("relay-authz-crl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = certs::Ca::generate("relay CA", 1).unwrap();
        let (ca_file, crl) = (dir.join("ca.pem"), dir.join("crl.pem"));
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let mut files = PolicyFiles::new(ca_file, Some(crl.clone()), None);

        // Not there at start: nothing revoked, warned once, no error.
        let first = files.check(true).unwrap().expect("a policy");
        assert!(first.revocation.is_empty());
        assert!(files.crl_missing_warned);
        assert!(files.check(false).unwrap().is_none(), "unchanged");
        assert!(files.check(true).unwrap().is_some(), "SIGHUP: still fine");

        // It appears: loaded.
        let agent = ca
            .issue(&certs::Leaf::new(certs::Role::Agent, "site-b", 1))
            .unwrap();
        let serial = certs::revocation::serial_of(&agent.cert_pem).unwrap();
        let listed = ca.revoke(None, &serial, 30).unwrap();
        std::fs::write(&crl, &listed.pem).unwrap();
        let loaded = files.check(false).unwrap().expect("the new list");
        assert_eq!(loaded.revocation.len(), 1);
        let info = certs::CertInfo::from_pem(&agent.cert_pem).unwrap();
        assert_eq!(
            loaded.check("site-b", Some(&info)),
            Err(RefusalKind::Revoked)
        );

        // It disappears: an error (the caller keeps the list in use), reported once.
        std::fs::remove_file(&crl).unwrap();
        let error = files.check(false).unwrap_err();
        assert!(matches!(error, PolicyError::Read(_)), "{error:?}");
        assert!(files.check(false).unwrap().is_none(), "reported once");
        assert!(files.check(true).is_err(), "also on SIGHUP");

        // It comes back damaged: an error too.
        std::fs::write(&crl, "not a CRL").unwrap();
        let error = files.check(false).unwrap_err();
        assert!(matches!(error, PolicyError::Crl(_)), "{error:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_changed_allow_list_is_seen_once() {
        let dir = std::env::temp_dir().join(format!("relay-authz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let list = dir.join("allowed");
        std::fs::write(&list, "site-a\n").unwrap();
        let mut files = PolicyFiles::new(dir.join("ca.pem"), None, Some(list.clone()));
        let first = files.check(false).unwrap().expect("first read");
        assert_eq!(first.allowed_count(), Some(1));
        assert!(files.check(false).unwrap().is_none());
        std::fs::write(&list, "site-a\nsite-b\n").unwrap();
        assert_eq!(
            files.check(false).unwrap().unwrap().allowed_count(),
            Some(2)
        );
        std::fs::remove_file(&list).unwrap();
        let error = files.check(false).unwrap_err();
        assert!(matches!(error, PolicyError::Read(_)), "{error:?}");
        assert!(error.to_string().starts_with("cannot read "), "{error}");
        assert!(files.check(false).unwrap().is_none(), "reported once");
        let _ = std::fs::remove_dir_all(dir);
    }
}

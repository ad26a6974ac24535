//! Writing certificates and keys to disk: keys are never readable by others, not even for a
//! moment, and nothing is overwritten unless asked.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Whether a file holds a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrecy {
    /// A certificate: mode 0644.
    Public,
    /// A private key: mode 0600.
    Private,
}

/// Errors from writing PEM files.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file exists and overwriting was not asked for.
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(String),
    /// Writing failed.
    #[error("cannot write {0}: {1}")]
    Io(String, std::io::Error),
}

/// Fails with [`StoreError::Exists`] when any of `paths` exists and `force` is false.
///
/// # Errors
///
/// As above.
pub fn refuse_overwrite(paths: &[&Path], force: bool) -> Result<(), StoreError> {
    match paths.iter().find(|p| !force && p.exists()) {
        Some(path) => Err(StoreError::Exists(path.display().to_string())),
        None => Ok(()),
    }
}

/// Writes `contents` to `path` atomically (a temporary file, synced, then renamed), created
/// with the mode `secrecy` calls for.
///
/// # Errors
///
/// When the folder is not writable or the disk is full.
pub fn write(path: &Path, contents: &[u8], secrecy: Secrecy) -> Result<(), StoreError> {
    let mode = match secrecy {
        Secrecy::Public => 0o644,
        Secrecy::Private => 0o600,
    };
    let tmp = path.with_extension("tmp");
    let shown = |p: &Path| p.display().to_string();
    let _ = std::fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| StoreError::Io(shown(&tmp), e))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| StoreError::Io(shown(&tmp), e))?;
    std::fs::rename(&tmp, path).map_err(|e| StoreError::Io(shown(path), e))
}

use std::fs;

use tempfile::TempDir;
use time::Duration;

use super::*;
use crate::{Ca, CertInfo, Issued, Leaf};

/// A CA and a sink's three files in a temporary directory.
struct Setup {
    dir: TempDir,
    ca: Ca,
    files: TlsFiles,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("reload test CA", 30).unwrap();
        let files = TlsFiles {
            ca: dir.path().join("ca.crt"),
            cert: dir.path().join("sink.crt"),
            key: dir.path().join("sink.key"),
        };
        fs::write(&files.ca, ca.cert_pem()).unwrap();
        let setup = Self { dir, ca, files };
        setup.install(&setup.issue(10));
        setup
    }

    fn issue(&self, days: u32) -> Issued {
        self.ca.issue(&Leaf::new(Role::Sink, "sink", days)).unwrap()
    }

    fn install(&self, issued: &Issued) {
        fs::write(&self.files.cert, &issued.cert_pem).unwrap();
        fs::write(&self.files.key, &issued.key_pem).unwrap();
    }

    fn reloader(&self) -> Reloader {
        Reloader::new(self.files.clone(), Role::Sink)
    }

    fn name(&self, file: &Path) -> String {
        file.display().to_string()
    }
}

fn not_after(loaded: &Loaded) -> OffsetDateTime {
    loaded.identity.info().not_after
}

#[test]
fn unchanged_files_are_not_reloaded() {
    let setup = Setup::new();
    let mut reloader = setup.reloader();
    let first = reloader.check().unwrap().expect("the first check loads");
    assert_eq!(first.identity.name(), "sink");
    assert!(reloader.check().unwrap().is_none());
    assert!(reloader.check().unwrap().is_none());
    // The set builds a sink config, which is what the caller does with it.
    crate::server_config(&first.ca, &first.identity, &[b"test"]).unwrap();
}

#[test]
fn a_rotated_certificate_is_loaded_with_its_new_expiry() {
    let setup = Setup::new();
    let mut reloader = setup.reloader();
    let old = reloader.force().unwrap();
    setup.install(&setup.issue(90));
    let new = reloader.check().unwrap().expect("rotated");
    assert!(not_after(&new) - not_after(&old) > Duration::days(79));
    assert!(reloader.check().unwrap().is_none());
}

#[test]
fn a_corrupt_key_is_reported_once_naming_the_file() {
    let setup = Setup::new();
    let mut reloader = setup.reloader();
    reloader.force().unwrap();
    fs::write(&setup.files.key, "-----BEGIN PRIVATE KEY-----\ngarbage\n").unwrap();
    let error = reloader.check().unwrap_err().to_string();
    assert!(
        error.starts_with(&format!(
            "{}: no usable private key found",
            setup.name(&setup.files.key)
        )),
        "{error}"
    );
    assert!(reloader.check().unwrap().is_none(), "reported once");
    // Fixed: loaded again.
    setup.install(&setup.issue(10));
    assert!(reloader.check().unwrap().is_some());
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let setup = Setup::new();
    let mut reloader = setup.reloader();
    reloader.force().unwrap();
    fs::write(&setup.files.key, setup.issue(10).key_pem).unwrap();
    let error = reloader.check().unwrap_err();
    assert!(matches!(error, Error::KeyMismatch { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        format!(
            "{} does not match certificate {}",
            setup.name(&setup.files.key),
            setup.name(&setup.files.cert)
        )
    );
}

#[test]
fn a_certificate_written_before_its_key_is_accepted_once_both_are() {
    let setup = Setup::new();
    let mut reloader = setup.reloader();
    reloader.force().unwrap();
    let next = setup.issue(20);
    fs::write(&setup.files.cert, &next.cert_pem).unwrap();
    assert!(matches!(reloader.check(), Err(Error::KeyMismatch { .. })));
    fs::write(&setup.files.key, &next.key_pem).unwrap();
    let loaded = reloader.check().unwrap().expect("both written");
    assert_eq!(
        loaded.identity.info(),
        &CertInfo::from_pem(&next.cert_pem).unwrap()
    );
}

#[test]
fn an_expired_or_future_certificate_is_refused() {
    let setup = Setup::new();
    let mut reloader = setup.reloader();
    reloader.force().unwrap();

    let mut expired = Leaf::new(Role::Sink, "sink", 1);
    expired.not_before -= Duration::days(10);
    expired.not_after = expired.not_before + Duration::days(1);
    setup.install(&setup.ca.issue(&expired).unwrap());
    let error = reloader.check().unwrap_err().to_string();
    assert!(
        error.starts_with(&format!(
            "{}: certificate expired at ",
            setup.name(&setup.files.cert)
        )),
        "{error}"
    );

    let mut future = Leaf::new(Role::Sink, "sink", 1);
    future.not_before += Duration::days(2);
    future.not_after += Duration::days(3);
    setup.install(&setup.ca.issue(&future).unwrap());
    let error = reloader.check().unwrap_err();
    assert!(matches!(error, Error::NotYetValid { .. }), "{error:?}");
}

#[test]
fn a_certificate_of_another_ca_or_role_is_refused() {
    let setup = Setup::new();
    let mut reloader = setup.reloader();
    reloader.force().unwrap();

    let other = Ca::generate("another CA", 30).unwrap();
    setup.install(&other.issue(&Leaf::new(Role::Sink, "sink", 10)).unwrap());
    let error = reloader.check().unwrap_err().to_string();
    assert!(
        error.contains("not a valid sink certificate under the CA in"),
        "{error}"
    );
    assert!(error.contains("UnknownIssuer"), "{error}");

    let agent = setup
        .ca
        .issue(&Leaf::new(Role::Agent, "site-a", 10))
        .unwrap();
    setup.install(&agent);
    let error = reloader.check().unwrap_err().to_string();
    assert!(error.contains("extended key usage"), "{error}");

    // The same agent certificate is what an agent's reloader wants.
    let mut as_agent = Reloader::new(setup.files.clone(), Role::Agent);
    assert_eq!(as_agent.force().unwrap().identity.name(), "site-a");

    // Without the chain check, another CA's certificate passes (the rest is still checked).
    setup.install(&other.issue(&Leaf::new(Role::Sink, "sink", 10)).unwrap());
    let mut unchained = setup.reloader().without_chain_check();
    unchained.force().unwrap();
}

#[test]
fn a_missing_file_is_reported_once() {
    let setup = Setup::new();
    let mut reloader = setup.reloader();
    reloader.force().unwrap();
    fs::remove_file(&setup.files.ca).unwrap();
    let error = reloader.check().unwrap_err().to_string();
    assert!(
        error.starts_with(&format!("cannot read {}: ", setup.name(&setup.files.ca))),
        "{error}"
    );
    assert!(reloader.check().unwrap().is_none());
    // SIGHUP: reported again.
    assert!(matches!(reloader.force(), Err(Error::Read { .. })));
    fs::write(&setup.files.ca, setup.ca.cert_pem()).unwrap();
    assert!(reloader.check().unwrap().is_some());
}

#[test]
fn force_reloads_unchanged_files() {
    let setup = Setup::new();
    let mut reloader = setup.reloader();
    reloader.force().unwrap();
    reloader.force().unwrap();
    assert!(reloader.check().unwrap().is_none());
}

/// Kubernetes secret volumes: each file is a symlink through `..data`, itself a symlink to a
/// timestamped directory, swapped atomically by a rename.
#[test]
fn files_behind_a_swapped_symlink_are_followed() {
    use std::os::unix::fs::symlink;

    let setup = Setup::new();
    let root = setup.dir.path().join("secret");
    fs::create_dir(&root).unwrap();
    let version = |name: &str, issued: &Issued| {
        let dir = root.join(name);
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("ca.crt"), setup.ca.cert_pem()).unwrap();
        fs::write(dir.join("tls.crt"), &issued.cert_pem).unwrap();
        fs::write(dir.join("tls.key"), &issued.key_pem).unwrap();
        let link = root.join("..data_tmp");
        symlink(name, &link).unwrap();
        fs::rename(&link, root.join("..data")).unwrap();
    };
    let first = setup.issue(10);
    version("..2024_01_01", &first);
    for file in ["ca.crt", "tls.crt", "tls.key"] {
        symlink(format!("..data/{file}"), root.join(file)).unwrap();
    }
    let files = TlsFiles {
        ca: root.join("ca.crt"),
        cert: root.join("tls.crt"),
        key: root.join("tls.key"),
    };
    let mut reloader = Reloader::new(files, Role::Sink);
    let old = reloader.force().unwrap();
    assert!(reloader.check().unwrap().is_none());

    version("..2024_02_01", &setup.issue(60));
    let new = reloader.check().unwrap().expect("swapped");
    assert!(not_after(&new) > not_after(&old));
    assert!(reloader.check().unwrap().is_none());
}

#[test]
fn debug_does_not_show_the_key() {
    let setup = Setup::new();
    let mut reloader = setup.reloader();
    reloader.force().unwrap();
    let debug = format!("{reloader:?}");
    assert!(!debug.contains("PRIVATE"), "{debug}");
    assert!(debug.contains("sink.key"), "{debug}");
}

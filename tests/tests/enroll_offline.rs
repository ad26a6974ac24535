//! End-to-end: enrollment without moving private keys, offline (issue 19), through the real
//! binaries.
//!
//! - `relay-certs request` at a site folder makes the key (0600) and a signing request;
//!   `relay-certs sign` at the CA folder issues the certificate without the key in reach, and
//!   writes no key anywhere; the agent then relays byte for byte with it, over QUIC and gRPC.
//! - Requests for the sink role, extra names or a CA are refused by `sign` with the reason.
//! - An issuing CA made by `init-issuer` signs a sink's and an agent's certificates as chains,
//!   and they relay with only the root as `--ca` on both ends; `show` prints both certificates;
//!   a root made with path length 0 cannot make one.
//! - A sink whose `--crl` does not exist yet starts, and revokes an agent once the file
//!   appears (`revoke`, SIGHUP); a list that disappears later is an error and stays in force.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use relay_tests::{
    Daemon, Pki, Transport, UdpCapture, WAIT, bin, datagrams, field, path, start_agent_over,
    start_sink,
};

/// `relay-certs ARGS…`, run to completion.
fn certs(args: &[&str]) -> Output {
    Command::new(bin("relay-certs"))
        .args(args)
        .output()
        .expect("run relay-certs")
}

/// `relay-certs ARGS…`, which must succeed; its stdout.
fn certs_ok(args: &[&str]) -> String {
    let out = certs(args);
    assert!(
        out.status.success(),
        "relay-certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names of the files in `dir`.
fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("list folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// At the site: `relay-certs request --name NAME --out SITE`; returns (key, request).
fn request(site: &Path, name: &str) -> (PathBuf, PathBuf) {
    let said = certs_ok(&[
        "request",
        "--role",
        "agent",
        "--name",
        name,
        "--out",
        &path(site),
    ]);
    assert!(said.contains("keep it here"), "{said}");
    (
        site.join(format!("{name}.key")),
        site.join(format!("{name}.csr")),
    )
}

/// Sends 300 datagrams through an agent holding `cert` to a sink holding `sink_cert`, both
/// trusting only `pki`'s root, over `transport`, and checks they arrive exactly.
fn relays(pki: &Pki, sink_cert: &(PathBuf, PathBuf), cert: &(PathBuf, PathBuf), t: Transport) {
    let capture = UdpCapture::bind();
    let (sink, sink_addr) = start_sink(pki, sink_cert, &[capture.addr()], None, &[]);
    let (agent, listen) = start_agent_over(t, &pki.ca(), cert, sink_addr, "localhost", &[]);
    agent.wait_for("connected to sink");
    let connected = sink.wait_for("agent connected");
    assert_eq!(field(&connected, "agent"), "site-b", "{connected}");
    let sent = datagrams(300, 0x19, 19);
    relay_tests::send_all(listen, &sent);
    capture.assert_exactly(&sent);
}

fn offline_request_and_sign(t: Transport) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(&dir.path().join("pki"));
    let sink_cert = pki.sink_cert("sink");
    let site = dir.path().join("site");
    let (key, csr) = request(&site, "site-b");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the site's key is 0600");
    let key_bytes = std::fs::read(&key).expect("read key");

    // The CA step runs with the key out of reach: moved out of the site folder (and, for a
    // test run as an unprivileged user, unreadable too). It is given no key path.
    let held = dir.path().join("held.key");
    std::fs::rename(&key, &held).expect("move the key aside");
    std::fs::set_permissions(&held, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    let ca_before = listing(&dir.path().join("pki"));
    let said = certs_ok(&[
        "sign",
        "--csr",
        &path(&csr),
        "--dir",
        &path(&dir.path().join("pki")),
    ]);
    assert!(said.contains("agent certificate CN=site-b"), "{said}");
    let ca_after = listing(&dir.path().join("pki"));
    assert_eq!(ca_before, ca_after, "the CA folder gains nothing");
    assert!(
        !ca_after.iter().any(|f| f.starts_with("site-b")),
        "{ca_after:?}"
    );
    assert_eq!(
        listing(&site),
        BTreeSet::from(["site-b.csr".to_owned(), "site-b.pem".to_owned()]),
        "the site folder gains the certificate only, and no key"
    );
    std::fs::set_permissions(&held, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::rename(&held, &key).expect("put the key back");
    assert_eq!(
        std::fs::read(&key).expect("key"),
        key_bytes,
        "the key untouched"
    );

    let shown = certs_ok(&["show", &path(&site.join("site-b.pem"))]);
    for want in [
        "subject:      CN=site-b",
        "usage (EKU):  clientAuth",
        "CA:           no",
    ] {
        assert!(shown.contains(want), "{want:?} in:\n{shown}");
    }
    relays(&pki, &sink_cert, &(site.join("site-b.pem"), key), t);
}

fn chains_through_an_issuing_ca(t: Transport) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(&dir.path().join("pki"));
    let issuer = dir.path().join("pki/issuer");
    let said = certs_ok(&[
        "init-issuer",
        "--dir",
        &path(&dir.path().join("pki")),
        "--name",
        "sink issuer",
    ]);
    assert!(said.contains("issuing CA CN=sink issuer"), "{said}");
    let mode = std::fs::metadata(issuer.join("issuer.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The sink's certificate from the issuing CA folder: a chain.
    certs_ok(&[
        "issue",
        "--role",
        "sink",
        "--name",
        "sink",
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
        "--dir",
        &path(&issuer),
    ]);
    let sink_cert = (issuer.join("sink.pem"), issuer.join("sink.key"));
    // The agent's from a request signed by the issuing CA: a chain too.
    let site = dir.path().join("site");
    let (key, csr) = request(&site, "site-b");
    certs_ok(&["sign", "--csr", &path(&csr), "--dir", &path(&issuer)]);
    let agent_cert = (site.join("site-b.pem"), key);

    let shown = certs_ok(&["show", &path(&agent_cert.0)]);
    for want in [
        "(certificate 1 of 2: the leaf)",
        "subject:      CN=site-b",
        "issuer:       CN=sink issuer",
        "(certificate 2 of 2: a CA)",
        "subject:      CN=sink issuer",
        "CA:           yes",
    ] {
        assert!(shown.contains(want), "{want:?} in:\n{shown}");
    }
    // Both ends trust only the root (`--ca pki/ca.pem`).
    relays(&pki, &sink_cert, &agent_cert, t);
}

relay_tests::over_each_transport!(offline_request_and_sign, chains_through_an_issuing_ca);

/// A request for `name` by a fresh key, after `edit` changed it, written to `dir/FILE`.
fn bad_request(dir: &Path, file: &str, edit: impl FnOnce(&mut CertificateParams)) -> PathBuf {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "site-b");
    edit(&mut params);
    let csr = params.serialize_request(&key).expect("request");
    let file = dir.join(file);
    std::fs::write(&file, csr.pem().expect("PEM")).expect("write request");
    file
}

#[test]
fn requests_for_a_sink_extra_names_or_a_ca_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki_dir = dir.path().join("pki");
    Pki::new(&pki_dir);
    let cases = [
        (
            bad_request(dir.path(), "sink.csr", |p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }),
            "asks for the sink role (serverAuth)",
        ),
        (
            bad_request(dir.path(), "names.csr", |p| {
                p.subject_alt_names = vec![
                    SanType::DnsName("site-b".try_into().expect("name")),
                    SanType::DnsName("sink.example.com".try_into().expect("name")),
                ];
            }),
            "asks for names other than its common name \"site-b\" (DNS:sink.example.com)",
        ),
        (
            bad_request(dir.path(), "ca.csr", |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            }),
            "asks to be a CA (basicConstraints CA:TRUE)",
        ),
    ];
    let before = listing(dir.path());
    for (csr, reason) in &cases {
        let out = certs(&["sign", "--csr", &path(csr), "--dir", &path(&pki_dir)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} was signed", csr.display());
        assert!(
            stderr.contains("request refused: it ") && stderr.contains(reason),
            "{}: {stderr}",
            csr.display()
        );
        assert!(stderr.contains(&path(csr)), "names the file: {stderr}");
    }
    assert_eq!(listing(dir.path()), before, "no certificate written");
    assert!(!listing(&pki_dir).iter().any(|f| f.starts_with("site-b")));

    // The site cannot ask for a sink certificate either.
    let out = certs(&[
        "request",
        "--role",
        "sink",
        "--name",
        "sink",
        "--out",
        &path(dir.path()),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("requests are for agents only"), "{stderr}");
}

#[test]
fn an_issuing_ca_needs_a_root_that_may_sign_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let old = dir.path().join("old");
    std::fs::create_dir_all(&old).expect("folder");
    // A root as `relay-certs init` made them before issuing CAs: path length 0.
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "old root");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let cert = params.self_signed(&key).expect("root");
    std::fs::write(old.join("ca.pem"), cert.pem()).expect("write");
    std::fs::write(old.join("ca.key"), key.serialize_pem()).expect("write");
    let out = certs(&["init-issuer", "--dir", &path(&old), "--name", "issuer"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ca.pem was made with path length 0")
            && stderr.contains("make a new root with `relay-certs init`"),
        "{stderr}"
    );
    assert!(!old.join("issuer").exists(), "nothing written");
}

#[test]
fn a_crl_that_appears_later_revokes_and_one_that_disappears_stays_in_force() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki_dir = dir.path().join("pki");
    let pki = Pki::new(&pki_dir);
    assert!(
        pki_dir.join("crl.pem").exists(),
        "init writes an empty list"
    );
    let crl = dir.path().join("sink-crl.pem");
    let site = dir.path().join("site");
    let (key, csr) = request(&site, "site-b");
    certs_ok(&["sign", "--csr", &path(&csr), "--dir", &path(&pki_dir)]);
    let agent_cert = (site.join("site-b.pem"), key);

    let capture = UdpCapture::bind();
    let extra = ["--crl", &path(&crl)];
    let (sink, sink_addr) = start_sink(
        &pki,
        &pki.sink_cert("sink"),
        &[capture.addr()],
        None,
        &extra,
    );
    let warned = sink.wait_for("revocation list not found");
    assert_eq!(warned["level"], "WARN", "{warned}");
    let (agent, listen) = start_agent_over(
        Transport::Quic,
        &pki.ca(),
        &agent_cert,
        sink_addr,
        "localhost",
        &[],
    );
    agent.wait_for("connected to sink");
    let sent = datagrams(100, 0x1A, 7);
    relay_tests::send_all(listen, &sent);
    capture.assert_exactly(&sent);

    // Revoked at the CA; the list reaches the sink; SIGHUP.
    let said = certs_ok(&[
        "revoke",
        "--dir",
        &path(&pki_dir),
        "--cert",
        &path(&agent_cert.0),
    ]);
    assert!(said.contains("CRL number 2"), "{said}");
    std::fs::copy(pki_dir.join("crl.pem"), &crl).expect("copy the list");
    sink.hangup();
    let reloaded = sink.wait_for("agent authorization reloaded");
    assert_eq!(reloaded["revoked"], 1, "{reloaded}");
    sink.wait_for("agent disconnected: no longer authorized");
    agent.wait_for("connection to sink lost");
    wait_refused(&sink, 1);

    // The list disappears: an error, and the agent stays revoked.
    std::fs::remove_file(&crl).expect("remove the list");
    sink.hangup();
    let error = sink.wait_for("authorization reload refused");
    assert_eq!(error["level"], "ERROR", "{error}");
    assert!(field(&error, "error").contains("sink-crl.pem"), "{error}");
    wait_refused(&sink, revoked_refusals(&sink.events()) + 1);
    assert_eq!(sink.count("agent connected"), 1, "never readmitted");
}

/// How many of `events` are handshakes of `CN=site-b` refused as revoked.
fn revoked_refusals(events: &[serde_json::Value]) -> usize {
    events
        .iter()
        .filter(|e| {
            e["security_event"] == "tls_handshake_refused"
                && e["kind"] == "revoked"
                && e["presented_subject"] == "CN=site-b"
        })
        .count()
}

/// Waits until the sink has refused `CN=site-b` as revoked `at_least` times (the agent
/// reconnects at least every second).
fn wait_refused(sink: &Daemon, at_least: usize) {
    let reached = sink.wait_events(WAIT, |events| revoked_refusals(events) >= at_least);
    assert!(
        reached,
        "fewer than {at_least} revoked refusals of CN=site-b; sink output:\n{}",
        sink.lines().join("\n")
    );
}

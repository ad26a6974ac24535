//! Online enrollment through the real binaries: `relay-certs token`, `relay-agent enroll`
//! against `relay-sink --enroll-listen`, then a relay with what it wrote; and every refusal,
//! each with its own reason for the user and its own security event at the sink.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use certs::enroll_tls::pinned_client_config;
use certs::token::fingerprint;
use proto::enroll_pb::EnrollRequest;
use relay_tests::enroll::{Enrollment, certs};
use relay_tests::{Pki, datagrams, field, metrics, send_paced, start_agent};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};

/// Runs `relay-agent enroll`; its stdout, or a panic with its stderr.
fn enrolled(e: &Enrollment, token: &str, dir: &Path) -> String {
    let out = e.enroll(token, dir);
    assert!(
        out.status.success(),
        "relay-agent enroll failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `relay-agent enroll` expecting a refusal; its stderr.
fn refused(e: &Enrollment, token: &str, dir: &Path) -> String {
    let out = e.enroll(token, dir);
    assert_eq!(
        out.status.code(),
        Some(1),
        "relay-agent enroll should fail; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The count of `outcome` in `relay_sink_enrollments_total{call="enroll"}`.
fn decided(e: &Enrollment, outcome: &str) -> f64 {
    metrics::Scrape::of(e.metrics()).value_or_zero(
        "relay_sink_enrollments_total",
        &[("call", "enroll"), ("outcome", outcome)],
    )
}

#[test]
fn a_token_enrolls_an_agent_that_then_relays_byte_for_byte() {
    let e = Enrollment::start(&[]);
    let token = e.token("site-b", "1h");
    let site = e.dir.path().join("site-b");
    let said = enrolled(&e, &token, &site);
    assert!(said.contains("enrolled as site-b"), "{said}");
    let key = site.join("agent.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key is the site's alone");
    let decision = e.wait_decision("issued");
    assert_eq!(field(&decision, "agent"), "site-b");
    // The CA side never had the key: no file of the issuer's folder holds it.
    let key_pem = std::fs::read_to_string(&key).unwrap();
    for entry in std::fs::read_dir(&e.issuer).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        assert!(
            !text.contains(key_pem.trim()),
            "the site's key is not at the CA"
        );
    }
    // The root in ca.pem is the one the token was made for.
    let ca = std::fs::read(site.join("ca.pem")).unwrap();
    assert_eq!(ca, std::fs::read(e.pki.ca()).unwrap());

    let (agent, listen) = start_agent(
        &site.join("ca.pem"),
        &(site.join("agent.pem"), key.clone()),
        e.sink_addr,
        "localhost",
        &[],
    );
    agent.wait_for("connected to sink");
    let sent = datagrams(1_000, 21, 21);
    send_paced(listen, &sent, 64, || e.capture.len());
    e.capture.assert_exactly(&sent);

    let again = enrolled(&e, &token, &site);
    assert!(again.contains("already enrolled as site-b"), "{again}");
    assert_eq!(decided(&e, "issued"), 1.0, "the second run asked nothing");
}

#[test]
fn a_token_used_by_another_key_is_refused_also_after_a_sink_restart() {
    let mut e = Enrollment::start(&[]);
    let token = e.token("site-b", "1h");
    enrolled(&e, &token, &e.dir.path().join("first"));
    let said = refused(&e, &token, &e.dir.path().join("second"));
    assert!(said.contains("used by another key"), "{said}");
    e.wait_decision("used_by_another_key");
    e.restart_sink();
    let said = refused(&e, &token, &e.dir.path().join("third"));
    assert!(said.contains("used by another key"), "{said}");
    e.wait_decision("used_by_another_key");
    assert_eq!(decided(&e, "used_by_another_key"), 1.0, "since the restart");
}

#[test]
fn an_altered_token_is_refused_for_its_signature() {
    let e = Enrollment::start(&[]);
    let token = e.token("site-b", "1h");
    // One character of the signature changed: still base64url, other bits.
    let mut altered: Vec<char> = token.chars().collect();
    let at = altered.len() - 5;
    altered[at] = if altered[at] == 'A' { 'B' } else { 'A' };
    let altered: String = altered.into_iter().collect();
    let said = refused(&e, &altered, &e.dir.path().join("site"));
    assert!(said.contains("signature"), "{said}");
    e.wait_decision("bad_signature");
}

#[test]
fn an_expired_token_is_refused_as_expired() {
    let e = Enrollment::start(&[]);
    let issuer = issuer_ca(&e.issuer);
    let root = der(&std::fs::read_to_string(e.pki.ca()).unwrap());
    let now = time::OffsetDateTime::now_utc();
    // Ended 10 minutes ago: beyond the 5 minutes of clock skew allowed.
    let token = certs::token::mint_between(
        &issuer,
        fingerprint(&root),
        "site-b",
        now - time::Duration::hours(1),
        now - time::Duration::minutes(10),
    )
    .unwrap();
    let said = refused(&e, &token, &e.dir.path().join("site"));
    assert!(said.contains("expired"), "{said}");
    e.wait_decision("expired_token");
}

#[test]
fn a_request_for_another_name_than_the_token_is_refused() {
    let e = Enrollment::start(&[]);
    let token = e.token("site-b", "1h");
    let request = certs::request::make("site-c").unwrap();
    let status = call(&e, &e.pki.ca(), &token, &request.csr_pem).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("site-c"), "{}", status.message());
    let decision = e.wait_decision("name_mismatch");
    assert_eq!(field(&decision, "agent"), "site-b");
}

#[test]
fn a_token_of_another_ca_is_refused_at_both_ends() {
    let e = Enrollment::start(&[]);
    let other_dir = e.dir.path().join("other");
    let other = Pki::new(&other_dir);
    certs(&[
        "init-issuer",
        "--dir",
        &relay_tests::path(&other_dir),
        "--name",
        "other issuer",
    ]);
    let theirs = certs(&[
        "token",
        "--dir",
        &relay_tests::path(&other_dir.join("issuer")),
        "--name",
        "site-b",
    ]);
    let theirs = theirs.trim();
    // The agent: the sink's chain does not hold the root the token names; nothing is sent.
    let said = refused(&e, theirs, &e.dir.path().join("site"));
    assert!(
        said.contains("not the sink the token was made for"),
        "{said}"
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let scrape = metrics::Scrape::of(e.metrics());
    assert_eq!(
        scrape.sum("relay_sink_enrollments_total"),
        0.0,
        "the sink was asked nothing"
    );
    // The sink, asked anyway: the signature is not its CAs'.
    let request = certs::request::make("site-b").unwrap();
    let status = call(&e, &e.pki.ca(), theirs, &request.csr_pem).unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    e.wait_decision("bad_signature");
    drop(other);
}

#[test]
fn enrolling_again_after_a_kill_between_request_and_answer_succeeds() {
    let e = Enrollment::start(&[]);
    let token = e.token("site-b", "1h");
    let site = e.dir.path().join("site");
    // What a run killed after sending its request leaves: its key on disk, and the token's use
    // recorded by the sink, the answer lost.
    std::fs::create_dir_all(&site).unwrap();
    let request = certs::request::make("site-b").unwrap();
    certs::store::write(
        &site.join("agent.key"),
        request.key_pem.as_bytes(),
        certs::store::Secrecy::Private,
    )
    .unwrap();
    call(&e, &e.pki.ca(), &token, &request.csr_pem).expect("the first request");
    e.wait_decision("issued");
    let said = enrolled(&e, &token, &site);
    assert!(said.contains("enrolled as site-b"), "{said}");
    e.wait_decision("reissued");
    assert_eq!(
        std::fs::read_to_string(site.join("agent.key")).unwrap(),
        request.key_pem,
        "the key of the first run"
    );
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// The issuing CA of `dir`, to sign tokens in the test.
fn issuer_ca(dir: &Path) -> certs::Ca {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    certs::Ca::from_pem(&read("issuer.pem"), &read("issuer.key")).unwrap()
}

/// Calls `Enroll` directly, trusting the root in `ca`, with `token` and the request `csr_pem`.
fn call(
    e: &Enrollment,
    ca: &Path,
    token: &str,
    csr_pem: &str,
) -> Result<proto::enroll_pb::Issued, tonic::Status> {
    let root = der(&std::fs::read_to_string(ca).unwrap());
    let tls = pinned_client_config(fingerprint(&root)).unwrap();
    let csr = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = agent::enroll::connect(&e.enroll_addr.to_string(), "localhost", tls)
            .await
            .expect("connect");
        client
            .enroll(EnrollRequest {
                token: token.to_owned(),
                csr_der: csr.as_ref().to_vec().into(),
            })
            .await
            .map(tonic::Response::into_inner)
    })
}

#[test]
fn a_sink_not_under_the_issuers_root_does_not_start_enrollment() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let other_dir = dir.path().join("other");
    let _other = Pki::new(&other_dir);
    certs(&[
        "init-issuer",
        "--dir",
        &relay_tests::path(&other_dir),
        "--name",
        "theirs",
    ]);
    let (cert, key) = pki.sink_cert("sink");
    let mut sink = relay_tests::Daemon::spawn(
        "relay-sink",
        &[
            "--listen",
            "127.0.0.1:0",
            "--ca",
            &relay_tests::path(&pki.ca()),
            "--cert",
            &relay_tests::path(&cert),
            "--key",
            &relay_tests::path(&key),
            "--forward",
            "127.0.0.1:9",
            "--enroll-listen",
            "127.0.0.1:0",
            "--enroll-issuer",
            &relay_tests::path(&other_dir.join("issuer")),
        ],
    );
    let status = sink.wait_exit(std::time::Duration::from_secs(10));
    assert!(!status.success());
    let said = sink.lines().join("\n");
    assert!(said.contains("not under the root CA"), "{said}");
}

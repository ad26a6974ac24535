//! Automatic renewal through the real binaries, with certificates issued for 60 seconds: an
//! enrolled agent renews twice on its own while it streams, and loses nothing; a revoked
//! agent's renewal is refused and it keeps its certificate until it expires.

use std::path::Path;
use std::time::Duration;

use relay_tests::enroll::{Enrollment, certs as run_certs};
use relay_tests::sflow::{SflowGen, StreamReport, stream_position};
use relay_tests::stream::send_stream;
use relay_tests::{Daemon, field, message, metrics, metrics_addr, start_agent};

/// Certificates live this long (`--enroll-validity`), so an agent renews every ~40 s.
const VALIDITY: &str = "60s";

/// Enrolls `name` into `dir` and starts an agent with what it wrote (metrics on).
fn enrolled_agent(e: &Enrollment, name: &str, dir: &Path) -> (Daemon, std::net::SocketAddr) {
    let token = e.token(name, "1h");
    let out = e.enroll(&token, dir);
    assert!(
        out.status.success(),
        "enroll: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (agent, listen) = start_agent(
        &dir.join("ca.pem"),
        &(dir.join("agent.pem"), dir.join("agent.key")),
        e.sink_addr,
        "localhost",
        &["--metrics-listen", "127.0.0.1:0"],
    );
    agent.wait_for("connected to sink");
    (agent, listen)
}

#[test]
fn an_enrolled_agent_renews_twice_on_its_own_while_streaming_without_loss() {
    let e = Enrollment::start(&["--enroll-validity", VALIDITY]);
    let site = e.dir.path().join("site");
    let (agent, listen) = enrolled_agent(&e, "site-r", &site);
    let first = std::fs::read_to_string(site.join("agent.pem")).unwrap();
    // 1,000 datagrams a second for 100 s: two renewals (at about 40 and 80 s) in the middle.
    let sender = send_stream(listen, SflowGen::new(2, 1, 3), 1_000, 100_000);
    relay_tests::wait_until("two renewals", Duration::from_secs(110), || {
        (agent.count("certificate renewed") >= 2).then_some(())
    });
    let sent = sender.join();
    assert!(
        e.capture
            .wait_until(Duration::from_secs(30), |r| r.len() >= sent.len()),
        "{} of {} arrived",
        e.capture.len(),
        sent.len()
    );
    std::thread::sleep(Duration::from_millis(500));
    let received: Vec<_> = e
        .capture
        .received()
        .iter()
        .filter_map(|d| stream_position(d))
        .collect();
    let report = StreamReport::of_positions(&sent, &received);
    assert_eq!(
        report,
        StreamReport::default(),
        "nothing lost, duplicated or reordered"
    );

    let renewals = e
        .sink
        .events()
        .into_iter()
        .filter(|ev| field(ev, "security_event") == "enrollment" && field(ev, "call") == "renew")
        .filter(|ev| field(ev, "outcome") == "issued")
        .count();
    assert!(renewals >= 2, "the sink issued {renewals} renewals");
    assert_ne!(
        std::fs::read_to_string(site.join("agent.pem")).unwrap(),
        first,
        "the certificate file was replaced"
    );
    assert!(
        agent.count("certificates reloaded") >= 2,
        "each new certificate was put in use by the reload"
    );
    let scrape = metrics::Scrape::of(metrics_addr(&agent));
    assert!(
        scrape.value_or_zero(
            "relay_agent_certificate_renewals_total",
            &[("outcome", "renewed")]
        ) >= 2.0
    );
}

#[test]
fn a_revoked_agents_renewal_is_refused_and_it_keeps_its_certificate_until_it_expires() {
    let e = Enrollment::start_revocable(&["--enroll-validity", VALIDITY]);
    let site = e.dir.path().join("site");
    let (agent, _) = enrolled_agent(&e, "site-x", &site);
    let held = std::fs::read_to_string(site.join("agent.pem")).unwrap();
    run_certs(&[
        "revoke",
        "--dir",
        &relay_tests::path(&e.issuer),
        "--cert",
        &relay_tests::path(&site.join("agent.pem")),
    ]);
    e.sink.hangup();
    e.sink.wait_for("agent authorization reloaded");
    // The agent's connection closes (it is revoked); its renewal comes at two thirds of 60 s.
    let refusal = agent.wait_for_event(
        "certificate renewal refused",
        Duration::from_secs(70),
        |ev| message(ev).contains("certificate renewal refused"),
    );
    assert!(field(&refusal, "error").contains("revoked"), "{refusal}");
    e.wait_decision("revoked");
    // Until its expiry (60 s from its issue), the certificate in use stays; then the agent
    // says it must enroll again.
    let not_after = certs::CertInfo::from_pem(&held).unwrap().not_after;
    while time::OffsetDateTime::now_utc() < not_after + time::Duration::seconds(1) {
        assert_eq!(
            std::fs::read_to_string(site.join("agent.pem")).unwrap(),
            held
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    agent.wait_for_event("the expiry", Duration::from_secs(10), |ev| {
        message(ev).contains("has expired and cannot renew")
    });
    let scrape = metrics::Scrape::of(metrics_addr(&agent));
    let renewals = |outcome| {
        scrape.value_or_zero(
            "relay_agent_certificate_renewals_total",
            &[("outcome", outcome)],
        )
    };
    assert!(renewals("refused") >= 1.0);
    assert_eq!(renewals("expired"), 1.0);
    assert_eq!(renewals("renewed"), 0.0);
    assert!(
        !agent
            .events()
            .iter()
            .any(|ev| message(ev).contains("certificate renewed")),
        "no renewal"
    );
}

//! End-to-end: certificates rotated under running binaries. While an agent streams, the sink's
//! and then the agent's certificate files are replaced and SIGHUP sent: new connections use
//! the new certificates (told apart by their expiry), the connection already open carries on,
//! and the stream loses nothing and repeats nothing. A corrupt key is refused with an error
//! naming the file, and the certificate in use stays.

use std::path::Path;
use std::time::Duration;

use relay_tests::{
    Pki, Transport, UdpCapture, WAIT, datagrams, field, http, metrics_addr, send_at_rate,
    start_agent_over, start_sink, wait_until,
};

const RELOADED: &str = "certificates reloaded";
const REFUSED: &str = "certificate reload refused";

fn sink_cert(pki: &Pki, days: &str, force: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut extra = vec!["--dns", "localhost", "--ip", "127.0.0.1", "--days", days];
    if force {
        extra.push("--force");
    }
    pki.issue("sink", "sink", &extra)
}

fn agent_cert(pki: &Pki, days: &str, force: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut extra = vec!["--days", days];
    if force {
        extra.push("--force");
    }
    pki.issue("agent", "site-a", &extra)
}

fn corrupt(key: &Path) {
    std::fs::write(key, "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n").expect("write key");
}

/// What a freshly connected agent says of the sink's certificate.
fn sink_expiry_seen_by_new_agent(pki: &Pki, sink: std::net::SocketAddr, name: &str) -> String {
    let cert = pki.issue("agent", name, &[]);
    let (agent, _) = start_agent_over(Transport::Quic, &pki.ca(), &cert, sink, "localhost", &[]);
    field(
        &agent.wait_for("connected to sink"),
        "sink_certificate_expires",
    )
    .to_owned()
}

#[test]
fn rotated_certificates_serve_new_connections_and_the_stream_loses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path());
    let capture = UdpCapture::bind();
    let sink_files = sink_cert(&pki, "30", false);
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let (mut sink, sink_addr) = start_sink(&pki, &sink_files, &[capture.addr()], None, &metrics);
    let agent_files = agent_cert(&pki, "30", false);
    let (agent, listen) = start_agent_over(
        Transport::Quic,
        &pki.ca(),
        &agent_files,
        sink_addr,
        "localhost",
        &metrics,
    );
    let first_sink_expiry = field(
        &agent.wait_for("connected to sink"),
        "sink_certificate_expires",
    )
    .to_owned();

    let sent = datagrams(8_000, 0x5A, 21);
    std::thread::scope(|s| {
        let sender = s.spawn(|| send_at_rate(listen, &sent, 1_000));
        // Traffic flows before the first reload.
        assert!(
            capture.wait_until(WAIT, |r| !r.is_empty()),
            "the stream arrives"
        );

        // 1. The sink's certificate is renewed (90 days instead of 30): SIGHUP.
        sink_cert(&pki, "90", true);
        sink.hangup();
        let reloaded = sink.wait_for(RELOADED);
        let new_sink_expiry = field(&reloaded, "expires").to_owned();
        assert_ne!(new_sink_expiry, first_sink_expiry, "{reloaded}");
        assert_eq!(
            sink_expiry_seen_by_new_agent(&pki, sink_addr, "site-b"),
            new_sink_expiry,
            "a new connection gets the new certificate"
        );
        assert_eq!(
            agent.count("connected to sink"),
            1,
            "the open connection carried on"
        );

        // 2. The agent's certificate is renewed (60 days): SIGHUP; then a corrupt key and
        // SIGHUP again, which is refused.
        agent_cert(&pki, "60", true);
        agent.hangup();
        let renewed = agent.wait_for(RELOADED);
        let new_agent_expiry = field(&renewed, "expires").to_owned();
        corrupt(&agent_files.1);
        agent.hangup();
        let refused = agent.wait_for(REFUSED);
        assert!(
            field(&refused, "error").contains(agent_files.1.to_str().expect("UTF-8")),
            "the error names the key file: {refused}"
        );
        assert_eq!(agent.count(RELOADED), 1, "the corrupt set was not taken");

        // The agent's next connection (the sink restarts) presents the renewed certificate,
        // not the corrupt one, and the stream carries on.
        assert!(sink.terminate().success());
        let (restarted, again) = start_sink(
            &pki,
            &sink_files,
            &[capture.addr()],
            Some(sink_addr),
            &metrics,
        );
        assert_eq!(again, sink_addr);
        sink = restarted;
        agent.wait_for_nth("connected to sink", 2, WAIT);
        // The agent logs its connection when the handshake completes; the sink lists it once
        // its stream is accepted, a moment later.
        let sink_metrics = metrics_addr(&sink);
        let (agents, site_a) = wait_until("site-a in the sink's /agents", WAIT, || {
            let agents = http::get_json(sink_metrics, "/agents").expect("/agents");
            let found = agents
                .as_array()
                .and_then(|list| list.iter().find(|a| a["agent"] == "site-a"))
                .cloned();
            found.map(|site_a| (agents, site_a))
        });
        assert_eq!(
            site_a["certificate_expires"], new_agent_expiry,
            "the agent presents its renewed certificate: {agents}"
        );

        // 3. A corrupt key for the sink: refused, and new agents still get the sink's
        // certificate in use.
        corrupt(&sink_files.1);
        sink.hangup();
        let refused = sink.wait_for(REFUSED);
        assert!(
            field(&refused, "error").contains(sink_files.1.to_str().expect("UTF-8")),
            "the error names the key file: {refused}"
        );
        assert_eq!(
            sink_expiry_seen_by_new_agent(&pki, sink_addr, "site-c"),
            new_sink_expiry,
            "the sink's certificate in use stays"
        );
        sender.join().expect("sender");
    });

    assert!(
        capture.wait_until(WAIT, |r| r.len() >= sent.len()),
        "{} of {} arrived",
        capture.len(),
        sent.len()
    );
    // Intentional: time for a duplicate to show up (beyond assert_exactly's own).
    std::thread::sleep(Duration::from_millis(300));
    capture.assert_exactly(&sent);
}

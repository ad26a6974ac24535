//! End-to-end: what an operator sees of a running relay. A real Prometheus scrapes both
//! binaries' `/metrics` during a relay and its query API must agree with what was sent;
//! `promtool check metrics` must accept both expositions; `/healthz`, `/readyz` and the sink's
//! `/agents` must tell the truth while the sink is down and once it is back.

use std::net::SocketAddr;
use std::time::Duration;

use relay_tests::fixture::{METRICS, Relay};
use relay_tests::metrics::Scrape;
use relay_tests::prometheus::{self, Prometheus};
use relay_tests::sflow::SflowGen;
use relay_tests::{
    Pki, Transport, UdpCapture, WAIT, free_sink_port, free_udp_port, http, metrics_addr,
    send_paced, start_agent_over, start_sink, wait_until,
};

fn sflow(n: usize) -> Vec<Vec<u8>> {
    let mut generator = SflowGen::new(3, 2, 11);
    (0..n).map(|_| generator.datagram()).collect()
}

/// Waits until `path` on `addr` answers with `status`; returns the body.
fn wait_status(addr: SocketAddr, path: &str, status: u16, timeout: Duration) -> String {
    let mut last = None;
    let what = format!("{path} to answer {status}");
    let body = wait_until(&what, timeout, || {
        let response = http::get(addr, path).expect("metrics endpoint answers");
        if response.status == status {
            return Some(response.body);
        }
        last = Some(response);
        None
    });
    if let Some(last) = last {
        eprintln!(
            "{path} answered {} ({}) before {status}",
            last.status,
            last.body.trim()
        );
    }
    body
}

#[test]
fn prometheus_sees_the_agent_receive_and_the_sink_replay_every_datagram() {
    if let Err(why) = prometheus::installed() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    const N: usize = 3_000;
    let relay = Relay::over(Transport::Quic)
        .sink(&METRICS)
        .agent(&METRICS)
        .spawn();
    let (capture, listen) = (&relay.capture, relay.listen);
    let (agent_metrics, sink_metrics) = (relay.agent_metrics(), relay.sink_metrics());
    let server = Prometheus::start(&[("agent", agent_metrics), ("sink", sink_metrics)])
        .expect("prometheus starts");
    relay.agent.wait_for("connected to sink");

    let sent = sflow(N);
    send_paced(listen, &sent, 32, || capture.len());
    assert!(capture.wait_until(WAIT, |r| r.len() >= N));
    capture.assert_exactly(&sent);

    let n = N as f64;
    let received = server
        .wait_for(
            "relay_agent_datagrams_received_total",
            |s| s.len() == 1 && s[0].value == n,
            Duration::from_secs(30),
        )
        .expect("Prometheus has the agent's received count");
    eprintln!("agent: {}", received[0]);
    let replayed = server
        .wait_for(
            "sum(relay_sink_datagrams_replayed_total)",
            |s| s.len() == 1 && s[0].value == n,
            Duration::from_secs(30),
        )
        .expect("Prometheus has the sink's replayed count");
    eprintln!("sink: {}", replayed[0]);
    // What is lost where: nothing, anywhere, for each of the six sFlow streams.
    let gaps = server
        .wait_for(
            "relay_sink_sflow_sequence_gaps_total",
            |s| s.len() == 6,
            Duration::from_secs(10),
        )
        .expect("six sFlow streams at the sink");
    assert!(gaps.iter().all(|s| s.value == 0.0), "{gaps:?}");
    let per_stream = server
        .query("relay_agent_sflow_datagrams_total")
        .expect("query");
    assert_eq!(per_stream.iter().map(|s| s.value).sum::<f64>(), n);

    // Both expositions pass promtool's checks (format and naming lint).
    for addr in [agent_metrics, sink_metrics] {
        // The raw response: its content type is the point here.
        let exposition = http::get(addr, "/metrics").expect("scrape");
        assert_eq!(exposition.status, 200);
        assert!(
            exposition
                .content_type
                .as_deref()
                .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
            "{:?}",
            exposition.content_type
        );
        if let Err(problems) = prometheus::promtool_check_metrics(&exposition.body) {
            panic!("promtool check metrics on {addr}: {problems}");
        }
    }

    // The sink's list of connected agents names the agent, from its certificate.
    let agents = http::get_json(sink_metrics, "/agents").expect("/agents");
    let list = agents.as_array().expect("a list");
    assert_eq!(list.len(), 1, "{agents}");
    assert_eq!(list[0]["agent"], "site-a", "{agents}");
    assert_eq!(list[0]["transport"], "quic", "{agents}");
    assert_eq!(list[0]["datagrams"].as_u64(), Some(N as u64), "{agents}");
    assert!(list[0]["certificate_expires"].is_string(), "{agents}");
    let expiry = server
        .query("relay_sink_agent_certificate_expiry_seconds{agent=\"site-a\"}")
        .expect("query");
    assert!(
        expiry.len() == 1 && expiry[0].value > 86_400.0,
        "the agent's certificate expires in over a day: {expiry:?}"
    );
}

#[test]
fn agent_is_not_ready_while_its_sink_is_down_without_a_spool() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path());
    let capture = UdpCapture::bind();
    // The sink's address is known before it runs: the agent starts first, with nowhere to go
    // (so the port is probed: the agent must be given it, and the sink binds it later).
    let sink_at = free_sink_port();
    let (agent, _listen) = start_agent_over(
        Transport::Quic,
        &pki.ca(),
        &pki.agent_cert("site-a"),
        sink_at,
        "localhost",
        &METRICS,
    );
    let agent_metrics = metrics_addr(&agent);
    assert_eq!(
        http::get(agent_metrics, "/healthz")
            .expect("healthz")
            .status,
        200
    );
    let why = wait_status(agent_metrics, "/readyz", 503, WAIT);
    assert!(
        why.contains("not connected, and no spool"),
        "the reason is given: {why}"
    );

    let (sink, _) = start_sink(
        &pki,
        &pki.sink_cert("sink"),
        &[capture.addr()],
        Some(sink_at),
        &METRICS,
    );
    agent.wait_for("connected to sink");
    wait_status(agent_metrics, "/readyz", 200, WAIT);
    let sink_metrics = metrics_addr(&sink);
    wait_status(sink_metrics, "/readyz", 200, WAIT);
    assert_eq!(
        http::get(sink_metrics, "/healthz").expect("healthz").status,
        200
    );
    let exposition = Scrape::of(agent_metrics);
    let sink_label = sink_at.to_string();
    let sink_label = ("sink", sink_label.as_str());
    assert_eq!(
        exposition.value("relay_agent_connected", &[sink_label]),
        Some(1.0),
        "{exposition}"
    );
    let failures = |reason: &str| {
        exposition.value(
            "relay_agent_connect_failures_total",
            &[("reason", reason), sink_label],
        )
    };
    assert!(
        failures("unreachable").is_some() || failures("timeout").is_some(),
        "{exposition}"
    );
}

#[test]
fn agent_with_a_spool_stays_ready_while_its_sink_is_down() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path());
    let spool = dir.path().join("spool");
    let spool = spool.to_str().expect("UTF-8 path");
    // A sink address nothing listens on: probed, since nothing may bind it.
    let (agent, _listen) = start_agent_over(
        Transport::Quic,
        &pki.ca(),
        &pki.agent_cert("site-a"),
        free_udp_port(),
        "localhost",
        &[&METRICS[..], &["--spool-dir", spool]].concat(),
    );
    let agent_metrics = metrics_addr(&agent);
    agent.wait_for("cannot connect to sink");
    wait_status(agent_metrics, "/readyz", 200, Duration::from_secs(1));
}

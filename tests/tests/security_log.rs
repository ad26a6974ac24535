//! End-to-end: the sink's security events, as a SIEM reads them from `--log-format json`.
//! A refused handshake is one WARN line with `security_event`, the peer's address, the reason
//! and the subject of the certificate it presented; a flood of refusals is a bounded number of
//! lines whose held-back counts add up to the flood, and the metric counts every one.

use std::time::Duration;

use relay_tests::metrics;
use relay_tests::{Daemon, Pki, Transport, UdpCapture, WAIT, bare, datagrams, start_sink};
use serde_json::Value;

const REFUSED: &str = "agent refused: TLS handshake failed";

fn refusals(sink: &Daemon) -> Vec<Value> {
    sink.events()
        .into_iter()
        .filter(|e| e["security_event"] == "tls_handshake_refused")
        .collect()
}

#[test]
fn a_refused_handshake_is_one_json_line_naming_peer_reason_and_presented_subject() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(&dir.path().join("ours"));
    let other = Pki::new(&dir.path().join("theirs"));
    let capture = UdpCapture::bind();
    let (sink, sink_addr) = start_sink(&pki, &pki.sink_cert("sink"), &[capture.addr()], None, &[]);

    let intruder = other.agent_cert("intruder-7");
    let refused = bare::relay_one_batch(
        Transport::Quic,
        sink_addr,
        &pki.ca(),
        Some(&intruder),
        &datagrams(1, 0xEE, 1),
    );
    assert!(refused.is_err(), "a certificate of another CA is refused");
    sink.wait_for(REFUSED);
    // Intentional: time for a second line to show up, were there one.
    std::thread::sleep(Duration::from_millis(300));
    let lines = refusals(&sink);
    assert_eq!(lines.len(), 1, "exactly one line: {lines:?}");
    let line = &lines[0];
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["message"], REFUSED, "{line}");
    assert_eq!(line["transport"], "quic", "{line}");
    assert_eq!(line["kind"], "unknown_issuer", "{line}");
    assert_eq!(line["presented_subject"], "CN=intruder-7", "{line}");
    assert!(
        line["remote"]
            .as_str()
            .is_some_and(|r| r.starts_with("127.0.0.1:")),
        "{line}"
    );
    assert!(
        line["reason"]
            .as_str()
            .is_some_and(|r| r.contains("UnknownIssuer")),
        "{line}"
    );
    assert!(line["timestamp"].is_string(), "{line}");
    assert_eq!(capture.len(), 0, "nothing relayed for the intruder");
}

#[test]
fn a_thousand_refusals_in_a_second_are_a_few_lines_that_count_them_all() {
    const FLOOD: usize = 1_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path());
    let capture = UdpCapture::bind();
    let (sink, sink_addr) = start_sink(
        &pki,
        &pki.sink_cert("sink"),
        &[capture.addr()],
        None,
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let metrics = relay_tests::metrics_addr(&sink);

    let took = bare::flood_without_client_cert(sink_addr, &pki.ca(), FLOOD, 64);
    eprintln!("{FLOOD} handshakes without a client certificate in {took:?}");
    // One more after a pause: its line reports what the limit held back since the last line.
    // (Intentional: the pause lets the log's rate-limit window pass.)
    std::thread::sleep(Duration::from_millis(300));
    bare::flood_without_client_cert(sink_addr, &pki.ca(), 1, 1);

    // Every refusal counted.
    metrics::wait_value(
        metrics,
        WAIT,
        "relay_sink_handshakes_refused_total",
        &[("reason", "no_certificate")],
        (FLOOD + 1) as f64,
    );
    // The last one's line written (the lines' counts add up to every refusal, checked below).
    let all_reported = |events: &[Value]| {
        let reported: u64 = events
            .iter()
            .filter(|e| e["security_event"] == "tls_handshake_refused")
            .map(|l| 1 + l["earlier_refusals_not_logged"].as_u64().unwrap_or(0))
            .sum();
        reported >= (FLOOD + 1) as u64
    };
    sink.wait_events(WAIT, all_reported);

    let lines = refusals(&sink);
    let seconds = took.as_secs_f64().ceil() + 1.0;
    // At most ten lines a second per kind of refusal (the limit), plus the first.
    let bound = (10.0 * seconds) as usize + 1;
    assert!(
        !lines.is_empty() && lines.len() <= bound,
        "{} lines for {} refusals in {took:?}: more than {bound}",
        lines.len(),
        FLOOD + 1
    );
    let reported: u64 = lines
        .iter()
        .map(|l| 1 + l["earlier_refusals_not_logged"].as_u64().expect("a count"))
        .sum();
    assert_eq!(
        reported,
        (FLOOD + 1) as u64,
        "the lines and their held-back counts add up to every refusal"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["kind"] == "no_certificate" && l["presented_subject"] == "-"),
        "{lines:?}"
    );
}

//! The Prometheus harness itself (`relay_tests::prometheus`), against the real `prometheus`
//! and `promtool`: a server that scrapes its own `/metrics` and answers PromQL, the target
//! health its failure messages carry, and `promtool check metrics` accepting classic
//! expositions (Prometheus's own among them) and rejecting broken ones. The relay's own
//! metrics are tested elsewhere.
//!
//! Skipped, with the reason printed, only where Prometheus is not installed (tests/run.sh
//! installs it).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay_tests::prometheus::{self, Prometheus, SELF_JOB, promtool_check_metrics};
use relay_tests::{free_tcp_port, http};

#[test]
fn scrapes_itself_and_answers_queries_and_reports_a_target_that_is_down() {
    let started = Instant::now();
    // A loopback port nothing listens on.
    let closed = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let prom = match Prometheus::start_with_self(&[("closed", closed)]) {
        Ok(prom) => prom,
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
    let timeout = Duration::from_secs(20);

    let up = prom
        .wait_for(
            &format!(r#"up{{job="{SELF_JOB}"}}"#),
            |s| s.len() == 1 && s[0].value == 1.0,
            timeout,
        )
        .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", prom.log()));
    assert_eq!(up[0].label("instance"), Some(&*prom.addr().to_string()));

    let build = prom.query("prometheus_build_info").unwrap();
    assert_eq!(build.len(), 1, "{build:?}");
    assert_eq!(build[0].label("job"), Some(SELF_JOB));
    assert!(
        build[0].label("version").is_some_and(|v| !v.is_empty()),
        "{}",
        build[0]
    );

    // Scalars, and Prometheus's own rejection of a bad expression.
    assert_eq!(prom.query("1 + 2").unwrap()[0].value, 3.0);
    let e = prom.query("up{").unwrap_err();
    assert!(e.contains("HTTP 400") && e.contains("parse error"), "{e}");

    // The target that cannot be scraped: down, with the reason, in what a failed wait says.
    prom.wait_for(r#"up{job="closed"}"#, |s| s.len() == 1, timeout)
        .unwrap();
    let e = prom
        .wait_for(
            r#"up{job="closed"}"#,
            |s| s.iter().any(|s| s.value == 1.0),
            Duration::from_millis(500),
        )
        .unwrap_err();
    assert!(e.contains(r#"up{instance="127.0.0.1:"#), "{e}");
    assert!(
        e.contains("closed http://") && e.contains(" down (") && e.contains("connection refused"),
        "{e}"
    );
    let e = prom
        .wait_targets_up(Duration::from_millis(500))
        .unwrap_err();
    assert!(
        e.contains(&format!("{SELF_JOB} http://{}/metrics up", prom.addr())),
        "{e}"
    );

    // The exposition it serves, read with the harness's HTTP client.
    let metrics = http::get(prom.addr(), "/metrics").unwrap();
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        metrics.content_type
    );
    assert!(metrics.body.contains("\nprometheus_build_info{"));
    promtool_check_metrics(&metrics.body).unwrap();

    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn promtool_accepts_a_classic_exposition_and_rejects_broken_ones() {
    if let Err(reason) = prometheus::installed() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let valid = "\
# HELP relay_sink_datagrams_replayed_total Datagrams replayed to the collectors.
# TYPE relay_sink_datagrams_replayed_total counter
relay_sink_datagrams_replayed_total 42
# HELP relay_agent_datagrams_dropped_total Datagrams dropped, by reason.
# TYPE relay_agent_datagrams_dropped_total counter
relay_agent_datagrams_dropped_total{reason=\"queue_full\"} 0
relay_agent_datagrams_dropped_total{reason=\"truncated\"} 1
# HELP relay_agent_batch_size_bytes Size of the batches sent.
# TYPE relay_agent_batch_size_bytes histogram
relay_agent_batch_size_bytes_bucket{le=\"1024\"} 1
relay_agent_batch_size_bytes_bucket{le=\"+Inf\"} 2
relay_agent_batch_size_bytes_sum 5000
relay_agent_batch_size_bytes_count 2
";
    promtool_check_metrics(valid).unwrap();

    let no_help = "# TYPE relay_x_total counter\nrelay_x_total 1\n";
    let e = promtool_check_metrics(no_help).unwrap_err();
    assert!(e.contains("no help text"), "{e}");

    let malformed = "# HELP relay_x_total X.\n# TYPE relay_x_total counter\nrelay_x_total{ 1\n";
    let e = promtool_check_metrics(malformed).unwrap_err();
    assert!(e.contains("parsing error"), "{e}");

    // OpenMetrics style (the family without `_total`): not what promtool 2.42 reads.
    let openmetrics = "# HELP relay_x X.\n# TYPE relay_x counter\nrelay_x_total 1\n# EOF\n";
    assert!(promtool_check_metrics(openmetrics).is_err());
}

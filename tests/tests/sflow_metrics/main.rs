//! End-to-end tests of `relay-sink --sflow-metrics`, sFlow interface counters served at
//! `/metrics/sflow`, through the real agent and sink:
//!
//! - [`rate`]: a real Prometheus scrapes them, and `rate()` matches the counter samples sent
//!   across a 32-bit wrap and an agent restart; `promtool check metrics` accepts them.
//! - [`truth`]: every exported series equals what tshark decodes from the datagrams replayed,
//!   for the project's generator and for pmacctd's sfprobe.

mod rate;
mod truth;

use std::net::SocketAddr;

use relay_tests::{Daemon, Pki, UdpCapture, metrics_addr, start_agent, start_sink};

/// A CA, a capture, a sink with `--sflow-metrics` replaying to the capture, and an agent
/// named `site` connected to it (with `agent_args` besides the harness's).
struct Relay {
    /// Holds the certificates.
    _dir: tempfile::TempDir,
    collector: UdpCapture,
    /// Kept running for the test.
    _sink: Daemon,
    /// The sink's metrics listener (`/metrics`, `/metrics/sflow`).
    metrics: SocketAddr,
    agent: Daemon,
    /// Where the agent receives sFlow (its first listen address).
    listen: SocketAddr,
}

impl Relay {
    fn start(site: &str, agent_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let collector = UdpCapture::bind();
        let (sink, sink_addr) = start_sink(
            &pki,
            &pki.sink_cert("sink"),
            &[collector.addr()],
            None,
            &["--metrics-listen", "127.0.0.1:0", "--sflow-metrics"],
        );
        let metrics = metrics_addr(&sink);
        let (agent, listen) = start_agent(
            &pki.ca(),
            &pki.agent_cert(site),
            sink_addr,
            "localhost",
            agent_args,
        );
        agent.wait_for("connected to sink");
        Self {
            _dir: dir,
            collector,
            _sink: sink,
            metrics,
            agent,
            listen,
        }
    }
}

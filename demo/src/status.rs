//! The demo's status line: datagrams per second in and out, drops, and the agent's transport,
//! read from the metrics of the agent and the sink that run in the demo's process.

use std::time::Instant;

/// What the status line is made of.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Totals {
    at: Instant,
    received: u64,
    replayed: u64,
    dropped: u64,
    transport: &'static str,
}

impl Default for Totals {
    fn default() -> Self {
        Self {
            at: Instant::now(),
            received: 0,
            replayed: 0,
            dropped: 0,
            transport: "down",
        }
    }
}

impl Totals {
    pub(crate) fn read(agent: &agent::Metrics, sink: &sink::Metrics) -> Self {
        let agent_side = agent.registry().gather();
        let sum = |name: &str| -> f64 {
            agent_side
                .iter()
                .filter(|f| f.name() == name)
                .flat_map(|f| f.get_metric())
                .map(|m| m.get_counter().get_value())
                .sum()
        };
        let in_use = |transport: &str| {
            agent_side
                .iter()
                .filter(|f| f.name() == "relay_agent_transport")
                .flat_map(|f| f.get_metric())
                .any(|m| {
                    m.get_gauge().get_value() == 1.0
                        && m.get_label().iter().any(|l| l.value() == transport)
                })
        };
        Self {
            at: Instant::now(),
            received: agent.datagrams_received.get(),
            replayed: sink.datagrams_replayed(),
            // The demo's agent relays sFlow only (the default): what is not sFlow is dropped.
            dropped: sum("relay_agent_datagrams_dropped_total") as u64
                + sum("relay_agent_not_sflow_datagrams_total") as u64
                + sink.replay_errors()
                + sink.replay_queue_drops(),
            transport: if in_use("quic") {
                "QUIC"
            } else if in_use("grpc") {
                "gRPC"
            } else {
                "down"
            },
        }
    }

    /// Whether datagrams were received or replayed since `before`.
    pub(crate) fn moved_since(&self, before: &Self) -> bool {
        self.received != before.received || self.replayed != before.replayed
    }

    /// `in 1200/s  out 1200/s  dropped 0  (total in 36000, out 36000)  link QUIC`
    pub(crate) fn status(&self, before: &Self) -> String {
        let seconds = self.at.duration_since(before.at).as_secs_f64().max(0.001);
        let rate = |now: u64, then: u64| (now.saturating_sub(then) as f64 / seconds).round();
        format!(
            "in {:.0}/s  out {:.0}/s  dropped {}  (total in {}, out {})  link {}",
            rate(self.received, before.received),
            rate(self.replayed, before.replayed),
            self.dropped,
            self.received,
            self.replayed,
            self.transport
        )
    }
}

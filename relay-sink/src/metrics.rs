//! The sink's metrics: Prometheus families registered once at start, and the handles the hot
//! path bumps (an atomic add each; no name or label lookup per datagram).
//!
//! Names are `relay_sink_*`, units in the names, `_total` on counters; the docs/metrics.md's "Metrics"
//! section lists every one. Labels: `transport` (2 values), `reason` (a fixed list),
//! `destination` (the configured `--forward` addresses) and `agent` (the names in the agents'
//! certificates, as many as the CA has issued and that connect).

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use runtime::accounting::SflowAccounting;
use runtime::observe::{counter, counter_vec, float_gauge_vec, gauge, gauge_vec};

use crate::catch_up::Paced;
use crate::labels::{RefusalKind, Transport, Violation};

/// The sink's metrics. Shared as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    accepted: [IntCounter; Transport::ALL.len()],
    refused: [IntCounter; RefusalKind::ALL.len()],
    /// Open connections closed because a reload revoked their agent or took it off the list.
    closed: [IntCounter; 2],
    /// Agent connections open now.
    pub agents_connected: IntGauge,
    /// Batches received from agents.
    pub batches_received: IntCounter,
    /// Datagrams received from agents.
    pub datagrams_received: IntCounter,
    /// Datagram payload bytes received from agents.
    pub bytes_received: IntCounter,
    /// Batches an agent sent again that had already been replayed (dropped, acknowledged).
    pub batches_duplicate: IntCounter,
    /// Datagrams in those batches.
    pub datagrams_duplicate: IntCounter,
    protocol_errors: [IntCounter; Violation::ALL.len()],
    catch_up_datagrams: [IntCounter; Paced::ALL.len()],
    /// Seconds agents' catch-up batches waited for the catch-up pace, all together.
    pub catch_up_wait_seconds: prometheus::Counter,
    /// Connections refused because `--max-connections` were open.
    pub connections_refused_max: IntCounter,
    /// Datagrams no destination's filter took (`destination=""`, `reason="unmatched"`).
    pub datagrams_unmatched: IntCounter,
    destinations: DestinationFamilies,
    agents: AgentFamilies,
    /// Seconds until each connected agent's certificate expires, by `agent`.
    pub agent_certificate_expiry: GaugeVec,
    /// Seconds until the sink's own certificate expires.
    pub certificate_expiry: prometheus::Gauge,
    /// Sequence-gap accounting of the sFlow replayed (loss before and inside the relay).
    pub sflow: SflowAccounting,
}

/// The families labelled by `destination`, whose series each destination creates at start.
#[derive(Debug)]
struct DestinationFamilies {
    replayed: IntCounterVec,
    bytes: IntCounterVec,
    dropped: IntCounterVec,
    filtered: IntCounterVec,
    not_after: IntGaugeVec,
}

/// The families labelled by `agent`, whose series each agent creates when it first connects.
#[derive(Debug)]
struct AgentFamilies {
    connections: IntGaugeVec,
    datagrams: IntCounterVec,
    bytes: IntCounterVec,
    dropped: IntCounterVec,
}

/// The handles of one replay destination's series.
#[derive(Debug, Clone)]
pub struct DestinationMetrics {
    /// Datagrams sent to the destination.
    pub replayed: IntCounter,
    /// Their bytes.
    pub bytes: IntCounter,
    /// Datagrams the destination's socket refused (port closed, unreachable, too large).
    pub errors: IntCounter,
    /// Datagrams dropped because the destination's queue stayed full.
    pub queue_drops: IntCounter,
    /// Datagrams queued for the destination when its `not-after` came, discarded.
    pub expired: IntCounter,
    /// Datagrams the destination's filter left out.
    pub filtered: IntCounter,
    /// When the destination ends, Unix seconds; 0 when it does not.
    pub not_after: IntGauge,
}

/// The handles of one agent identity's series (shared by its connections).
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    /// Connections of this agent open now.
    pub connections: IntGauge,
    /// Datagrams received from it.
    pub datagrams: IntCounter,
    /// Their payload bytes.
    pub bytes: IntCounter,
    /// Datagrams from it dropped for being over `--max-datagram-bytes`.
    pub dropped_too_large: IntCounter,
    /// Datagrams from it dropped for being over `--agent-max-pps`.
    pub dropped_rate_limited: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(runtime::observe::DEFAULT_SFLOW_MAX_STREAMS)
    }
}

impl Metrics {
    /// Registers every family in a registry of its own; follows at most `sflow_max_streams`
    /// sFlow streams one by one.
    pub fn new(sflow_max_streams: usize) -> Self {
        let r = Registry::new();
        let destinations = DestinationFamilies::register(&r);
        // In the destinations' drop family, with an empty `destination` (which Prometheus
        // reads as no such label): no destination took these.
        let datagrams_unmatched = destinations.dropped.with_label_values(&["", "unmatched"]);
        Self {
            accepted: accepted(&r),
            refused: refused(&r),
            closed: closed(&r),
            connections_refused_max: connections_refused_max(&r),
            agents_connected: gauge(
                &r,
                "relay_sink_agents_connected",
                "Agent connections open now.",
            ),
            batches_received: counter(
                &r,
                "relay_sink_batches_received_total",
                "Batches received from agents (duplicates included).",
            ),
            datagrams_received: counter(
                &r,
                "relay_sink_datagrams_received_total",
                "Datagrams received from agents (duplicates included).",
            ),
            bytes_received: counter(
                &r,
                "relay_sink_bytes_received_total",
                "Datagram payload bytes received from agents (duplicates included).",
            ),
            batches_duplicate: counter(
                &r,
                "relay_sink_batches_duplicate_total",
                "Batches an agent sent again that had already been replayed: acknowledged, not replayed again.",
            ),
            datagrams_duplicate: counter(
                &r,
                "relay_sink_datagrams_duplicate_total",
                "Datagrams in the duplicate batches.",
            ),
            protocol_errors: protocol_errors(&r),
            catch_up_datagrams: catch_up_datagrams(&r),
            catch_up_wait_seconds: catch_up_wait_seconds(&r),
            agents: AgentFamilies::register(&r),
            agent_certificate_expiry: float_gauge_vec(
                &r,
                "relay_sink_agent_certificate_expiry_seconds",
                "Seconds until the certificate of a connected agent expires (the soonest of its connections).",
                &["agent"],
            ),
            certificate_expiry: runtime::observe::float_gauge(
                &r,
                "relay_sink_certificate_expiry_seconds",
                "Seconds until the sink's own certificate expires (negative once expired).",
            ),
            sflow: SflowAccounting::new(&r, "relay_sink", sflow_max_streams),
            datagrams_unmatched,
            destinations,
            registry: r,
        }
    }

    /// The registry to gather from.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The counter of connections accepted over `transport`.
    pub(crate) fn accepted(&self, transport: Transport) -> &IntCounter {
        &self.accepted[transport as usize]
    }

    /// The counter of handshakes refused for `kind`.
    pub(crate) fn refused(&self, kind: RefusalKind) -> &IntCounter {
        &self.refused[kind.index()]
    }

    /// The counter of open connections closed for `kind` (revoked; anything else counts as
    /// not allowed).
    pub(crate) fn closed(&self, kind: RefusalKind) -> &IntCounter {
        &self.closed[usize::from(kind != RefusalKind::Revoked)]
    }

    /// Connections accepted, both transports.
    pub fn connections_accepted(&self) -> u64 {
        self.accepted.iter().map(IntCounter::get).sum()
    }

    /// Handshakes refused, all reasons.
    pub fn handshakes_refused(&self) -> u64 {
        self.refused.iter().map(IntCounter::get).sum()
    }

    /// The counter of protocol violations of kind `violation`.
    pub(crate) fn protocol_error(&self, violation: Violation) -> &IntCounter {
        &self.protocol_errors[violation as usize]
    }

    /// The counter of datagrams paced as `paced`.
    pub(crate) fn catch_up(&self, paced: Paced) -> &IntCounter {
        &self.catch_up_datagrams[paced as usize]
    }

    /// Protocol violations, all reasons.
    pub fn protocol_errors(&self) -> u64 {
        self.protocol_errors.iter().map(IntCounter::get).sum()
    }

    /// The handles of one destination's series, created (at 0) now.
    pub fn for_destination(&self, destination: &str) -> DestinationMetrics {
        DestinationMetrics {
            replayed: self.destinations.replayed.with_label_values(&[destination]),
            bytes: self.destinations.bytes.with_label_values(&[destination]),
            errors: self
                .destinations
                .dropped
                .with_label_values(&[destination, "destination_error"]),
            queue_drops: self
                .destinations
                .dropped
                .with_label_values(&[destination, "queue_full"]),
            expired: self
                .destinations
                .dropped
                .with_label_values(&[destination, "expired"]),
            filtered: self.destinations.filtered.with_label_values(&[destination]),
            not_after: self
                .destinations
                .not_after
                .with_label_values(&[destination]),
        }
    }

    /// The handles of one agent's series (created at first use, then shared).
    pub fn for_agent(&self, agent: &str) -> AgentMetrics {
        AgentMetrics {
            connections: self.agents.connections.with_label_values(&[agent]),
            datagrams: self.agents.datagrams.with_label_values(&[agent]),
            bytes: self.agents.bytes.with_label_values(&[agent]),
            dropped_too_large: self.agents.dropped.with_label_values(&[agent, "too_large"]),
            dropped_rate_limited: self
                .agents
                .dropped
                .with_label_values(&[agent, "rate_limited"]),
        }
    }

    /// Datagrams replayed, all destinations together.
    pub fn datagrams_replayed(&self) -> u64 {
        runtime::observe::sum(&self.destinations.replayed, None)
    }

    /// Datagrams a destination refused, all destinations together.
    pub fn replay_errors(&self) -> u64 {
        runtime::observe::sum(
            &self.destinations.dropped,
            Some(("reason", "destination_error")),
        )
    }

    /// Datagrams dropped at full destination queues, all destinations together.
    pub fn replay_queue_drops(&self) -> u64 {
        runtime::observe::sum(&self.destinations.dropped, Some(("reason", "queue_full")))
    }
}

// === the families, one registering step each ===

/// `relay_sink_connections_accepted_total{transport}`, a handle per transport.
fn accepted(r: &Registry) -> [IntCounter; Transport::ALL.len()] {
    let family = counter_vec(
        r,
        "relay_sink_connections_accepted_total",
        "Agent connections that completed the mutual-TLS handshake, by transport.",
        &["transport"],
    );
    Transport::ALL.map(|t| family.with_label_values(&[t.as_str()]))
}

/// `relay_sink_handshakes_refused_total{reason}`, a handle per kind of refusal.
fn refused(r: &Registry) -> [IntCounter; RefusalKind::ALL.len()] {
    let family = counter_vec(
        r,
        "relay_sink_handshakes_refused_total",
        "Handshakes refused or failed, by reason (no_certificate, unknown_issuer, bad_signature, wrong_usage, expired, not_yet_valid, revoked, not_allowed, too_many_connections, timeout, other).",
        &["reason"],
    );
    RefusalKind::ALL.map(|k| family.with_label_values(&[k.as_str()]))
}

/// `relay_sink_connections_closed_total{reason}`: revoked, not allowed.
fn closed(r: &Registry) -> [IntCounter; 2] {
    let family = counter_vec(
        r,
        "relay_sink_connections_closed_total",
        "Open agent connections the sink closed because a reload revoked the agent's certificate or took it off the allow-list, by reason (revoked, not_allowed).",
        &["reason"],
    );
    [RefusalKind::Revoked, RefusalKind::NotAllowed].map(|k| family.with_label_values(&[k.as_str()]))
}

/// `relay_sink_connections_refused_total{reason="max_connections"}`.
fn connections_refused_max(r: &Registry) -> IntCounter {
    counter_vec(
        r,
        "relay_sink_connections_refused_total",
        "Connections refused before their handshake, by reason (max_connections).",
        &["reason"],
    )
    .with_label_values(&["max_connections"])
}

/// `relay_sink_protocol_errors_total{reason}`, a handle per violation.
fn protocol_errors(r: &Registry) -> [IntCounter; Violation::ALL.len()] {
    let family = counter_vec(
        r,
        "relay_sink_protocol_errors_total",
        "Agent streams ended for a protocol violation, by reason (frame_too_large, malformed, truncated, frame_timeout, decompressed_too_large, compression).",
        &["reason"],
    );
    Violation::ALL.map(|v| family.with_label_values(&[v.as_str()]))
}

/// `relay_sink_catch_up_datagrams_total{kind}`, a handle per kind of pacing.
fn catch_up_datagrams(r: &Registry) -> [IntCounter; Paced::ALL.len()] {
    let family = counter_vec(
        r,
        "relay_sink_catch_up_datagrams_total",
        "Datagrams paced as catch-up before replay, by kind (catch_up: marked by the agent; older_agent: from an agent too old to mark its batches). Live datagrams are not paced.",
        &["kind"],
    );
    Paced::ALL.map(|p| family.with_label_values(&[p.as_str()]))
}

/// `relay_sink_catch_up_wait_seconds_total` (a float counter).
fn catch_up_wait_seconds(r: &Registry) -> prometheus::Counter {
    let c = prometheus::Counter::new(
        "relay_sink_catch_up_wait_seconds_total",
        "Seconds catch-up batches waited for the catch-up pace (--catch-up-max-pps), all connections together.",
    )
    .expect("a valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

impl DestinationFamilies {
    fn register(r: &Registry) -> Self {
        Self {
            replayed: counter_vec(
                r,
                "relay_sink_datagrams_replayed_total",
                "Datagrams sent to a destination (each destination counts its own).",
                &["destination"],
            ),
            bytes: counter_vec(
                r,
                "relay_sink_bytes_replayed_total",
                "Datagram bytes sent to a destination.",
                &["destination"],
            ),
            dropped: counter_vec(
                r,
                "relay_sink_datagrams_dropped_total",
                "Datagrams not replayed, by destination and reason (queue_full, destination_error, expired: queued when its not-after came; unmatched, with an empty destination: taken by no destination's filter).",
                &["destination", "reason"],
            ),
            filtered: counter_vec(
                r,
                "relay_sink_datagrams_filtered_total",
                "Datagrams a destination's filter (agents, sites) left out.",
                &["destination"],
            ),
            not_after: gauge_vec(
                r,
                "relay_sink_destination_not_after_seconds",
                "When a destination's replay ends (its not-after), Unix seconds; 0 when it does not end.",
                &["destination"],
            ),
        }
    }
}

impl AgentFamilies {
    fn register(r: &Registry) -> Self {
        Self {
            connections: gauge_vec(
                r,
                "relay_sink_agent_connections",
                "Connections open now, by agent (the name in its certificate).",
                &["agent"],
            ),
            datagrams: counter_vec(
                r,
                "relay_sink_agent_datagrams_received_total",
                "Datagrams received, by agent (duplicates included).",
                &["agent"],
            ),
            bytes: counter_vec(
                r,
                "relay_sink_agent_bytes_received_total",
                "Datagram payload bytes received, by agent (duplicates included).",
                &["agent"],
            ),
            dropped: counter_vec(
                r,
                "relay_sink_agent_datagrams_dropped_total",
                "Datagrams from an agent not replayed, by agent and reason (too_large, rate_limited).",
                &["agent", "reason"],
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_over_destinations() {
        let metrics = Metrics::default();
        let a = metrics.for_destination("127.0.0.1:6343");
        let b = metrics.for_destination("127.0.0.1:6344");
        a.replayed.inc_by(3);
        b.replayed.inc_by(4);
        a.errors.inc();
        b.queue_drops.inc_by(2);
        assert_eq!(metrics.datagrams_replayed(), 7);
        assert_eq!(metrics.replay_errors(), 1);
        assert_eq!(metrics.replay_queue_drops(), 2);
        metrics.accepted(Transport::Grpc).inc();
        metrics.refused(RefusalKind::Timeout).inc();
        assert_eq!(metrics.connections_accepted(), 1);
        assert_eq!(metrics.handshakes_refused(), 1);
    }
}

//! The agent's metrics: Prometheus families registered once at start, and the handles the hot
//! path bumps (an atomic add each; no name or label lookup per datagram or batch).
//!
//! Names are `relay_agent_*`, units in the names, `_total` on counters; the docs/metrics.md's "Metrics"
//! section lists every one. Per-sink series carry a `sink` label (the configured address):
//! their number is the number of configured sinks.

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use runtime::accounting::SflowAccounting;
use runtime::admission::SOURCE_NOT_ALLOWED;
use runtime::observe::{counter, counter_vec, float_gauge_vec, gauge_vec};

/// Why a datagram was dropped, as the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The queue between the UDP receive loops and the batcher was full.
    QueueFull,
    /// A sink's intake queue was full (its spool writes fell behind).
    SinkQueueFull,
    /// No spool and the memory backlog (`--backlog-bytes`) full: oldest dropped.
    BacklogFull,
    /// The spool reached `--spool-max-bytes`: oldest dropped.
    SpoolFull,
    /// Spooled longer than `--spool-max-age`.
    TooOld,
    /// A spooled batch could not be read back.
    SpoolUnreadable,
}

impl DropReason {
    /// Every reason, pre-registered so each series exists (at 0) from the start.
    pub const ALL: [Self; 6] = [
        Self::QueueFull,
        Self::SinkQueueFull,
        Self::BacklogFull,
        Self::SpoolFull,
        Self::TooOld,
        Self::SpoolUnreadable,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::SinkQueueFull => "sink_queue_full",
            Self::BacklogFull => "backlog_full",
            Self::SpoolFull => "spool_full",
            Self::TooOld => "too_old",
            Self::SpoolUnreadable => "spool_unreadable",
        }
    }
}

/// Why a connection attempt to a sink failed, as the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The sink refused this agent's certificate (or the handshake).
    Refused,
    /// The sink's certificate failed our checks (wrong CA, wrong name, expired).
    UntrustedSink,
    /// No answer in time (UDP blocked, host down, packets dropped).
    Timeout,
    /// Unreachable or connection refused (nothing listening).
    Unreachable,
    /// Anything else (name resolution, local errors).
    Other,
}

impl ConnectFailure {
    /// Every reason.
    pub const ALL: [Self; 5] = [
        Self::Refused,
        Self::UntrustedSink,
        Self::Timeout,
        Self::Unreachable,
        Self::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused_by_sink",
            Self::UntrustedSink => "untrusted_sink",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::Other => "other",
        }
    }
}

/// The agent's metrics. Shared as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Datagrams received on the UDP sockets.
    pub datagrams_received: IntCounter,
    /// Bytes (UDP payload) received.
    pub bytes_received: IntCounter,
    /// Datagrams dropped because the batcher's queue was full.
    pub dropped_queue_full: IntCounter,
    /// Batches made.
    pub batches: IntCounter,
    /// Bytes of the batch frames made, after compression.
    pub frame_bytes: IntCounter,
    /// Kernel receive-buffer drops per listen socket (from `/proc/net/udp`), by `listen`.
    pub kernel_drops: IntCounterVec,
    /// Sequence-gap accounting of the sFlow received (loss before the relay), and the count
    /// of what is not sFlow, by reason.
    pub sflow: SflowAccounting,
    /// Datagrams dropped for a source outside `--allow-sources`: the `source_not_allowed`
    /// reason of `relay_agent_not_sflow_datagrams_total`.
    pub source_not_allowed: IntCounter,
    dropped: IntCounterVec,
    sink: SinkFamilies,
}

/// The per-sink families, in three groups; [`Metrics::for_sink`] takes one sink's handles.
#[derive(Debug)]
struct SinkFamilies {
    delivery: DeliveryFamilies,
    backlog: BacklogFamilies,
    connection: ConnectionFamilies,
}

/// The links' traffic: what was sent, acknowledged and sent again.
#[derive(Debug)]
struct DeliveryFamilies {
    batches_sent: IntCounterVec,
    datagrams_sent: IntCounterVec,
    bytes_sent: IntCounterVec,
    batches_acknowledged: IntCounterVec,
    datagrams_acknowledged: IntCounterVec,
    batches_resent: IntCounterVec,
    catch_up_datagrams_sent: IntCounterVec,
    datagrams_filtered: IntCounterVec,
    not_after: IntGaugeVec,
}

/// What waits for an acknowledgement, in memory and in the spool.
#[derive(Debug)]
struct BacklogFamilies {
    backlog_batches: IntGaugeVec,
    backlog_memory_bytes: IntGaugeVec,
    spool_bytes: IntGaugeVec,
    spool_write_errors: IntCounterVec,
    spool_torn_tails: IntCounterVec,
    spool_corrupt_segments: IntCounterVec,
}

/// The connections to the sinks: attempts, failures, transport, round trip, certificate.
#[derive(Debug)]
struct ConnectionFamilies {
    connects: IntCounterVec,
    reconnects: IntCounterVec,
    connect_failures: IntCounterVec,
    connected: IntGaugeVec,
    transport: IntGaugeVec,
    fallbacks_to_grpc: IntCounterVec,
    returns_to_quic: IntCounterVec,
    rtt: prometheus::GaugeVec,
    quic_udp_bytes_sent: IntCounterVec,
    certificate_expiry: prometheus::GaugeVec,
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
        let dropped = counter_vec(
            &r,
            "relay_agent_datagrams_dropped_total",
            "Datagrams the agent dropped, by reason (and sink, where one sink's backlog dropped them).",
            &["reason", "sink"],
        );
        let dropped_queue_full = dropped.with_label_values(&[DropReason::QueueFull.as_str(), ""]);
        let sflow = SflowAccounting::new(&r, "relay_agent", sflow_max_streams);
        let sink = SinkFamilies {
            delivery: DeliveryFamilies::register(&r),
            backlog: BacklogFamilies::register(&r),
            connection: ConnectionFamilies::register(&r),
        };
        Self {
            datagrams_received: counter(
                &r,
                "relay_agent_datagrams_received_total",
                "Datagrams received on the agent's UDP sockets.",
            ),
            bytes_received: counter(
                &r,
                "relay_agent_bytes_received_total",
                "UDP payload bytes received on the agent's sockets.",
            ),
            dropped_queue_full,
            batches: counter(&r, "relay_agent_batches_total", "Batches made."),
            frame_bytes: counter(
                &r,
                "relay_agent_frame_bytes_total",
                "Bytes of the batch frames as first sent to each sink, summed over the sinks (after compression, before TLS): over relay_agent_bytes_received_total, what compression leaves.",
            ),
            kernel_drops: counter_vec(
                &r,
                "relay_agent_kernel_receive_drops_total",
                "Datagrams the kernel dropped because a listen socket's receive buffer was full (/proc/net/udp).",
                &["listen"],
            ),
            dropped,
            sink,
            source_not_allowed: sflow.not_sflow_reason(SOURCE_NOT_ALLOWED),
            sflow,
            registry: r,
        }
    }

    /// The registry to gather from.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The handles of one sink's series, created (at 0) now.
    pub fn for_sink(&self, addr: &str) -> SinkMetrics {
        let (d, b, c) = (
            &self.sink.delivery,
            &self.sink.backlog,
            &self.sink.connection,
        );
        let one = |family: &IntCounterVec| family.with_label_values(&[addr]);
        let dropped = DropReason::ALL.map(|r| self.dropped.with_label_values(&[r.as_str(), addr]));
        let connect_failures =
            ConnectFailure::ALL.map(|r| c.connect_failures.with_label_values(&[addr, r.as_str()]));
        let rtt = c.rtt.with_label_values(&[addr]);
        rtt.set(f64::NAN);
        SinkMetrics {
            batches_sent: one(&d.batches_sent),
            datagrams_sent: one(&d.datagrams_sent),
            bytes_sent: one(&d.bytes_sent),
            batches_acknowledged: one(&d.batches_acknowledged),
            datagrams_acknowledged: one(&d.datagrams_acknowledged),
            dropped,
            batches_resent: one(&d.batches_resent),
            catch_up_datagrams_sent: one(&d.catch_up_datagrams_sent),
            datagrams_filtered: one(&d.datagrams_filtered),
            not_after: d.not_after.with_label_values(&[addr]),
            backlog_batches: b.backlog_batches.with_label_values(&[addr]),
            backlog_memory_bytes: b.backlog_memory_bytes.with_label_values(&[addr]),
            spool_bytes: b.spool_bytes.with_label_values(&[addr]),
            spool_write_errors: one(&b.spool_write_errors),
            spool_torn_tails: one(&b.spool_torn_tails),
            spool_corrupt_segments: one(&b.spool_corrupt_segments),
            connects: one(&c.connects),
            reconnects: one(&c.reconnects),
            connect_failures,
            connected: c.connected.with_label_values(&[addr]),
            quic: c.transport.with_label_values(&[addr, "quic"]),
            grpc: c.transport.with_label_values(&[addr, "grpc"]),
            fallbacks_to_grpc: one(&c.fallbacks_to_grpc),
            returns_to_quic: one(&c.returns_to_quic),
            rtt,
            quic_udp_bytes_sent: one(&c.quic_udp_bytes_sent),
            certificate_expiry: c.certificate_expiry.with_label_values(&[addr]),
        }
    }
}

impl DeliveryFamilies {
    fn register(r: &Registry) -> Self {
        Self {
            batches_sent: counter_vec(
                r,
                "relay_agent_batches_sent_total",
                "Batches written to the sink's stream (resends included).",
                &["sink"],
            ),
            datagrams_sent: counter_vec(
                r,
                "relay_agent_datagrams_sent_total",
                "Datagrams in the batches written to the sink's stream (resends included).",
                &["sink"],
            ),
            bytes_sent: counter_vec(
                r,
                "relay_agent_bytes_sent_total",
                "Batch frame bytes written to the sink's stream, as sent (compressed; resends included).",
                &["sink"],
            ),
            batches_acknowledged: counter_vec(
                r,
                "relay_agent_batches_acknowledged_total",
                "Batches the sink acknowledged (replayed).",
                &["sink"],
            ),
            datagrams_acknowledged: counter_vec(
                r,
                "relay_agent_datagrams_acknowledged_total",
                "Datagrams in the batches the sink acknowledged (replayed).",
                &["sink"],
            ),
            batches_resent: counter_vec(
                r,
                "relay_agent_batches_resent_total",
                "Batches sent again after a reconnect (unacknowledged on the connection that broke).",
                &["sink"],
            ),
            catch_up_datagrams_sent: counter_vec(
                r,
                "relay_agent_catch_up_datagrams_sent_total",
                "Datagrams sent marked as catch-up (sent again, read back from the spool, or held back by an outage), which the sink paces.",
                &["sink"],
            ),
            datagrams_filtered: counter_vec(
                r,
                "relay_agent_datagrams_filtered_total",
                "Datagrams received that the sink's `agents` filter kept from it (they never left the site for that sink).",
                &["sink"],
            ),
            not_after: gauge_vec(
                r,
                "relay_agent_sink_not_after_seconds",
                "When the sink entry's feed ends (`not-after`), Unix seconds; 0 when it does not end.",
                &["sink"],
            ),
        }
    }
}

impl BacklogFamilies {
    fn register(r: &Registry) -> Self {
        Self {
            backlog_batches: gauge_vec(
                r,
                "relay_agent_backlog_batches",
                "Batches not yet acknowledged by the sink (memory and spool).",
                &["sink"],
            ),
            backlog_memory_bytes: gauge_vec(
                r,
                "relay_agent_backlog_memory_bytes",
                "Bytes the sink's backlog holds in memory (frames plus bookkeeping), bounded by --backlog-bytes.",
                &["sink"],
            ),
            spool_bytes: gauge_vec(
                r,
                "relay_agent_spool_bytes",
                "Bytes in the sink's spool on disk.",
                &["sink"],
            ),
            spool_write_errors: counter_vec(
                r,
                "relay_agent_spool_write_errors_total",
                "Spool writes that failed (a full disk); those batches were kept in memory only.",
                &["sink"],
            ),
            spool_torn_tails: counter_vec(
                r,
                "relay_agent_spool_torn_tails_total",
                "Spool segments found with a torn tail at start (cut off).",
                &["sink"],
            ),
            spool_corrupt_segments: counter_vec(
                r,
                "relay_agent_spool_corrupt_segments_total",
                "Spool segments found corrupt at start (set aside as .corrupt).",
                &["sink"],
            ),
        }
    }
}

impl ConnectionFamilies {
    fn register(r: &Registry) -> Self {
        Self {
            connects: counter_vec(
                r,
                "relay_agent_connects_total",
                "Connections to the sink that completed the handshake (the first included).",
                &["sink"],
            ),
            reconnects: counter_vec(
                r,
                "relay_agent_reconnects_total",
                "Connections to the sink after the first.",
                &["sink"],
            ),
            connect_failures: counter_vec(
                r,
                "relay_agent_connect_failures_total",
                "Failed connection attempts to the sink, by reason.",
                &["sink", "reason"],
            ),
            connected: gauge_vec(
                r,
                "relay_agent_connected",
                "1 while a connection to the sink is up.",
                &["sink"],
            ),
            transport: gauge_vec(
                r,
                "relay_agent_transport",
                "1 for the transport in use to the sink (quic or grpc), 0 for the other.",
                &["sink", "transport"],
            ),
            fallbacks_to_grpc: counter_vec(
                r,
                "relay_agent_fallbacks_to_grpc_total",
                "Times --transport auto carried on over gRPC because no QUIC handshake completed.",
                &["sink"],
            ),
            returns_to_quic: counter_vec(
                r,
                "relay_agent_returns_to_quic_total",
                "Times --transport auto moved back from gRPC to QUIC.",
                &["sink"],
            ),
            rtt: float_gauge_vec(
                r,
                "relay_agent_rtt_seconds",
                "Round-trip time to the sink as QUIC estimates it (latest); NaN when not connected over QUIC.",
                &["sink"],
            ),
            quic_udp_bytes_sent: counter_vec(
                r,
                "relay_agent_quic_udp_bytes_sent_total",
                "UDP payload bytes sent on QUIC connections to the sink: the frames with QUIC and TLS overhead, retransmissions, acknowledgements and keep-alives (what the link carries, less IP and UDP headers).",
                &["sink"],
            ),
            certificate_expiry: float_gauge_vec(
                r,
                "relay_agent_certificate_expiry_seconds",
                "Seconds until the agent's certificate for this sink expires (negative once expired).",
                &["sink"],
            ),
        }
    }
}

/// The transport a link uses, for [`SinkMetrics::set_transport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InUse {
    /// Not connected.
    None,
    /// QUIC.
    Quic,
    /// gRPC.
    Grpc,
}

/// The handles of one sink link's series.
#[derive(Debug)]
pub struct SinkMetrics {
    /// Batches written to the sink's stream.
    pub batches_sent: IntCounter,
    /// Datagrams in those batches.
    pub datagrams_sent: IntCounter,
    /// Their encoded bytes.
    pub bytes_sent: IntCounter,
    /// Batches the sink acknowledged.
    pub batches_acknowledged: IntCounter,
    /// Datagrams in those batches.
    pub datagrams_acknowledged: IntCounter,
    dropped: [IntCounter; DropReason::ALL.len()],
    /// Batches sent again after a reconnect (not acknowledged on the connection that broke).
    pub batches_resent: IntCounter,
    /// Datagrams sent marked as catch-up (paced by the sink).
    pub catch_up_datagrams_sent: IntCounter,
    /// Datagrams the sink's `agents` filter kept from it.
    pub datagrams_filtered: IntCounter,
    /// When the sink's feed ends, Unix seconds (0: never).
    pub not_after: IntGauge,
    /// Batches not yet acknowledged (gauge).
    pub backlog_batches: IntGauge,
    /// Bytes the backlog holds in memory (gauge).
    pub backlog_memory_bytes: IntGauge,
    /// Bytes in the spool (gauge).
    pub spool_bytes: IntGauge,
    /// Spool writes that failed (a full disk); those batches were kept in memory only.
    pub spool_write_errors: IntCounter,
    /// Spool segments found with a torn tail at start (cut off).
    pub spool_torn_tails: IntCounter,
    /// Spool segments found corrupt at start (set aside).
    pub spool_corrupt_segments: IntCounter,
    /// Successful connections (the first one included).
    pub connects: IntCounter,
    /// Successful connections after the first.
    pub reconnects: IntCounter,
    connect_failures: [IntCounter; ConnectFailure::ALL.len()],
    /// 1 while connected.
    pub connected: IntGauge,
    quic: IntGauge,
    grpc: IntGauge,
    /// Times `auto` fell back to gRPC because no QUIC handshake completed.
    pub fallbacks_to_grpc: IntCounter,
    /// Times `auto` moved back from gRPC to QUIC.
    pub returns_to_quic: IntCounter,
    /// QUIC's round-trip estimate, seconds.
    pub rtt: Gauge,
    /// UDP payload bytes sent on QUIC connections.
    pub quic_udp_bytes_sent: IntCounter,
    /// Seconds until this link's certificate expires.
    pub certificate_expiry: Gauge,
}

impl SinkMetrics {
    /// The drop counter for `reason`.
    pub fn dropped(&self, reason: DropReason) -> &IntCounter {
        // `ALL` lists the reasons in declaration order, so the discriminant is the index.
        &self.dropped[reason as usize]
    }

    /// Datagrams this sink's backlog dropped, all reasons together.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(IntCounter::get).sum()
    }

    /// Counts a failed connection attempt.
    pub fn connect_failed(&self, reason: ConnectFailure) {
        self.connect_failures[reason as usize].inc();
    }

    /// Failed connection attempts, all reasons together.
    pub fn connect_failures_total(&self) -> u64 {
        self.connect_failures.iter().map(IntCounter::get).sum()
    }

    /// Records the transport in use. The round-trip time is unknown (NaN) until a QUIC
    /// connection measures it.
    pub fn set_transport(&self, in_use: InUse) {
        if in_use != InUse::Quic {
            self.rtt.set(f64::NAN);
        }
        self.connected.set(i64::from(in_use != InUse::None));
        self.quic.set(i64::from(in_use == InUse::Quic));
        self.grpc.set(i64::from(in_use == InUse::Grpc));
    }

    /// The transport in use.
    pub fn transport(&self) -> InUse {
        if self.quic.get() == 1 {
            InUse::Quic
        } else if self.grpc.get() == 1 {
            InUse::Grpc
        } else {
            InUse::None
        }
    }
}

#[cfg(test)]
impl Default for SinkMetrics {
    fn default() -> Self {
        Metrics::default().for_sink("test")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_listed_in_declaration_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, r) in ConnectFailure::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn every_series_exists_from_the_start_and_the_exposition_is_well_formed() {
        let metrics = Metrics::default();
        let sink = metrics.for_sink("sink.example:4433");
        sink.dropped(DropReason::SpoolFull).inc_by(3);
        sink.set_transport(InUse::Grpc);
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &metrics.registry().gather(),
            &mut text,
        )
        .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains(
            "relay_agent_datagrams_dropped_total{reason=\"spool_full\",sink=\"sink.example:4433\"} 3"
        ));
        assert!(
            text.contains("relay_agent_datagrams_dropped_total{reason=\"queue_full\",sink=\"\"} 0")
        );
        assert!(
            text.contains("relay_agent_transport{sink=\"sink.example:4433\",transport=\"grpc\"} 1")
        );
        assert!(text.contains("relay_agent_connected{sink=\"sink.example:4433\"} 1"));
        for reason in ["too_short", "version", "address_type", "source_not_allowed"] {
            assert!(
                text.contains(&format!(
                    "relay_agent_not_sflow_datagrams_total{{reason=\"{reason}\"}} 0"
                )),
                "{reason}"
            );
        }
        assert_eq!(sink.transport(), InUse::Grpc);
        assert_eq!(sink.dropped_total(), 3);
    }
}

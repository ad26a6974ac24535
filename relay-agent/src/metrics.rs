//! The agent's counters: plain atomics bumped on the hot path, read for logs and by tests.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of the agent as a whole. Shared as `Arc<Metrics>`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Datagrams received on the UDP sockets.
    pub datagrams_received: AtomicU64,
    /// Bytes (UDP payload) received.
    pub bytes_received: AtomicU64,
    /// Datagrams dropped because the batcher's queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Batches made.
    pub batches: AtomicU64,
}

/// Counters of one sink link.
#[derive(Debug, Default)]
pub struct SinkMetrics {
    /// Batches written to the sink's stream.
    pub batches_sent: AtomicU64,
    /// Datagrams in those batches.
    pub datagrams_sent: AtomicU64,
    /// Highest batch sequence the sink acknowledged.
    pub acked_sequence: AtomicU64,
    /// Datagrams dropped because this sink's queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Datagrams lost in batches that were being written when a connection broke.
    pub dropped_connection_lost: AtomicU64,
    /// Successful connections (the first one included).
    pub connects: AtomicU64,
    /// Failed connection attempts.
    pub connect_failures: AtomicU64,
    /// The transport in use: 0 none (connecting), 1 QUIC, 2 gRPC.
    pub transport: AtomicU64,
    /// Times `auto` fell back to gRPC because no QUIC handshake completed.
    pub fallbacks_to_grpc: AtomicU64,
    /// Times `auto` moved back from gRPC to QUIC.
    pub returns_to_quic: AtomicU64,
}

/// Sets a gauge.
#[inline]
pub fn set(gauge: &AtomicU64, value: u64) {
    gauge.store(value, Ordering::Relaxed);
}

/// Adds `n` to `counter`.
#[inline]
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Reads `counter`.
pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

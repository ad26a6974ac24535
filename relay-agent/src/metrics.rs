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
    /// Datagrams dropped because this sink's intake queue was full (its spool too slow).
    pub dropped_queue_full: AtomicU64,
    /// Datagrams dropped from the backlog: oldest first, when memory (no spool) or the spool
    /// (size, age) was full, or unreadable from the spool.
    pub dropped_backlog_full: AtomicU64,
    /// Batches sent again after a reconnect (not acknowledged on the connection that broke).
    pub batches_resent: AtomicU64,
    /// Batches not yet acknowledged (gauge).
    pub backlog_batches: AtomicU64,
    /// Bytes in the spool (gauge).
    pub spool_bytes: AtomicU64,
    /// Spool writes that failed (a full disk); those batches were kept in memory only.
    pub spool_write_errors: AtomicU64,
    /// Spool segments found with a torn tail at start (cut off).
    pub spool_torn_tails: AtomicU64,
    /// Spool segments found corrupt at start (set aside).
    pub spool_corrupt_segments: AtomicU64,
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

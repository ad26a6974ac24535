//! The sink's counters: plain atomics bumped on the hot path, read for logs and by tests.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one sink process. Shared as `Arc<Metrics>`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Agent connections that completed the mutual-TLS handshake.
    pub connections_accepted: AtomicU64,
    /// Handshakes refused or failed (wrong CA, no certificate, wrong usage, timeout).
    pub handshakes_refused: AtomicU64,
    /// Batches received from agents.
    pub batches_received: AtomicU64,
    /// Datagrams received from agents.
    pub datagrams_received: AtomicU64,
    /// Batches an agent sent again that had already been replayed (dropped, acknowledged).
    pub batches_duplicate: AtomicU64,
    /// Datagrams in those batches.
    pub datagrams_duplicate: AtomicU64,
    /// Datagrams sent to a destination (counted once per destination).
    pub datagrams_replayed: AtomicU64,
    /// Datagrams a destination's socket refused (port closed, unreachable, too large).
    pub replay_errors: AtomicU64,
    /// Datagrams dropped because a destination's queue was full.
    pub replay_queue_drops: AtomicU64,
    /// Connections closed for a protocol violation (oversized or malformed frame).
    pub protocol_errors: AtomicU64,
}

impl Metrics {
    /// Adds `n` to `counter`.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

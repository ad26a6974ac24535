//! Receiving sFlow datagrams on UDP sockets.
//!
//! Each socket has a thread of its own, outside the runtime, so the sending side (batching,
//! compression, TLS) can never hold up receiving, and the runtime's thread is not woken by
//! every datagram that arrives (a socket in the runtime's epoll set wakes it once per
//! arrival, whether or not a task is waiting).
//!
//! Each wake-up takes everything the kernel has queued, up to [`udp::RECV_BATCH`] datagrams
//! per system call (recvmmsg), and hands them to the batcher as one chunk: one hand-off, one
//! clock reading and one update of the counters per call rather than per datagram. Once the
//! socket is empty the thread pauses for `coalesce` (1 ms by default) before it reads again,
//! so under load it wakes about once per pause instead of once per datagram, and takes
//! dozens of datagrams per call; the kernel's buffer holds them meanwhile. relay-perf
//! measured the gain (docs/benchmarks.md, "Benchmarks").
//!
//! Each datagram is checked against the [`Admission`] (`--allow-sources`, then `--accept`)
//! before it is copied: what it refuses is counted once, by reason, in
//! `relay_agent_not_sflow_datagrams_total`, logged (one warning per 10 s at most) and never
//! reaches the batcher. Everything received, refused or not, counts in
//! `relay_agent_datagrams_received_total`. The sFlow header is read once per datagram, for
//! both the check and the sequence accounting, into a list reused across calls.
//!
//! The receive loop never waits on the network: it hands each chunk to the batcher with a
//! non-blocking send, and when the batcher's queue is full the chunk is dropped, counted and
//! logged (rate-limited). The kernel buffer behind the socket absorbs bursts meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use proto::pb;
use proto::sflow::{Header, NotSflow};
use runtime::admission::{Admission, Verdict};
use runtime::ratelimit::RateLimit;
use runtime::udp;
use std::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Payload bytes are copied into arenas of this size, so each datagram holds a small share of
/// an allocation instead of a whole receive buffer.
const ARENA_LEN: usize = 256 * 1024;

/// Datagrams received together, in arrival order.
pub(crate) type Chunk = Vec<pb::Datagram>;

/// How long a blocked receive waits before it looks at the cancellation token again: the
/// most a shutdown waits for an idle receive thread.
pub(crate) const CANCEL_CHECK: Duration = Duration::from_millis(100);

/// Where a receive loop hands its datagrams, and what it lets through.
pub(crate) struct Receiver {
    /// The batcher's queue.
    pub(crate) batcher: mpsc::Sender<Chunk>,
    /// The agent's counters.
    pub(crate) metrics: Arc<Metrics>,
    /// What is relayed (`--accept`, `--allow-sources`).
    pub(crate) admission: Admission,
    /// Pause after emptying the socket.
    pub(crate) coalesce: Duration,
}

/// Receives until `token` is cancelled, sending the datagrams `admission` admits to `batcher`
/// in chunks, pausing `coalesce` each time the socket is empty. Blocks: run it on a thread of
/// its own.
pub(crate) fn receive_loop(socket: UdpSocket, receiver: Receiver, token: CancellationToken) {
    let Receiver {
        batcher,
        metrics,
        admission,
        coalesce,
    } = receiver;
    let local = socket.local_addr().ok();
    if let Err(error) = socket
        .set_nonblocking(false)
        .and_then(|()| socket.set_read_timeout(Some(CANCEL_CHECK)))
    {
        tracing::error!(?local, %error, "cannot set up the socket; receiving stops");
        return;
    }
    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut slots = udp::RecvBatch::default();
    let mut arena = BytesMut::with_capacity(ARENA_LEN);
    let full = RateLimit::new(Duration::from_secs(10));
    let refusals = RateLimit::new(Duration::from_secs(10));
    let mut headers: Vec<Result<Header, NotSflow>> = Vec::with_capacity(udp::RECV_BATCH);
    while !token.is_cancelled() {
        let n = match slots.recv(&socket, true) {
            Ok(n) => n,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(error) => {
                // ICMP errors and the like surface here on some systems; keep receiving.
                tracing::debug!(?local, %error, "receive error");
                continue;
            }
        };
        let received_unix_nanos = unix_nanos();
        let mut bytes = 0;
        let mut not_allowed = 0;
        // Allocated at the first datagram relayed: a flood of refused ones allocates nothing.
        let mut chunk = Vec::new();
        headers.clear();
        for i in 0..n {
            let data = slots.datagram(i);
            bytes += data.len();
            let source = slots.source(i).unwrap_or(unspecified);
            let verdict = admission.check(source, data);
            match verdict {
                Verdict::Relay(header) => {
                    headers.push(header);
                    if chunk.capacity() == 0 {
                        chunk.reserve_exact(n - i);
                    }
                    chunk.push(
                        proto::wire::Datagram {
                            payload: copy_out(&mut arena, data),
                            source,
                            received_unix_nanos,
                        }
                        .to_proto(),
                    );
                    continue;
                }
                Verdict::NotSflow(reason) => headers.push(Err(reason)),
                Verdict::SourceNotAllowed => not_allowed += 1,
            }
            if let Some(more) = refusals.check() {
                let reason = verdict.reason().unwrap_or_default();
                let len = data.len();
                if verdict == Verdict::SourceNotAllowed {
                    tracing::warn!(?local, %source, len, reason, earlier_drops_not_logged = more, "datagram dropped: its source is not in --allow-sources");
                } else {
                    tracing::warn!(?local, %source, len, reason, earlier_drops_not_logged = more, "datagram dropped: not sflow v5 (--accept any relays any udp)");
                }
            }
        }
        metrics.datagrams_received.inc_by(n as u64);
        metrics.bytes_received.inc_by(bytes as u64);
        if not_allowed > 0 {
            metrics.source_not_allowed.inc_by(not_allowed);
        }
        metrics.sflow.observe_parsed(headers.drain(..));
        let drained = n < udp::RECV_BATCH;
        let relayed = chunk.len();
        if relayed > 0 && batcher.try_send(chunk).is_err() {
            metrics.dropped_queue_full.inc_by(relayed as u64);
            if let Some(more) = full.check() {
                tracing::warn!(
                    ?local,
                    dropped_datagrams = relayed,
                    earlier_drops_not_logged = more,
                    "batch queue full: datagrams dropped"
                );
            }
        }
        if drained && !coalesce.is_zero() {
            std::thread::sleep(coalesce);
        }
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn copy_out(arena: &mut BytesMut, data: &[u8]) -> Bytes {
    if arena.capacity() - arena.len() < data.len() {
        *arena = BytesMut::with_capacity(ARENA_LEN.max(data.len()));
    }
    arena.extend_from_slice(data);
    arena.split().freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_copies_are_exact_and_independent() {
        let mut arena = BytesMut::with_capacity(ARENA_LEN);
        let a = copy_out(&mut arena, b"first");
        let big = vec![7u8; 65_507];
        let b = copy_out(&mut arena, &big);
        let c = copy_out(&mut arena, b"third");
        assert_eq!(&a[..], b"first");
        assert_eq!(&b[..], &big[..]);
        assert_eq!(&c[..], b"third");
        let mut many = Vec::new();
        for i in 0..1000u32 {
            many.push((i, copy_out(&mut arena, &i.to_be_bytes().repeat(350))));
        }
        for (i, bytes) in many {
            assert_eq!(&bytes[..], &i.to_be_bytes().repeat(350)[..]);
        }
    }
}

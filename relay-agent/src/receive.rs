//! Receiving sFlow datagrams on UDP sockets.
//!
//! The receive loop never waits on the network: it hands each datagram to the batcher with a
//! non-blocking send, and when the batcher's queue is full the datagram is dropped, counted and
//! logged (rate-limited). The kernel buffer behind the socket absorbs bursts meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use proto::pb;
use runtime::ratelimit::RateLimit;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Room for the largest UDP payload (IPv6 allows up to 65,527 bytes), so nothing is truncated.
const RECV_BUF_LEN: usize = 65_536;
/// Payload bytes are copied into arenas of this size, so each datagram holds a small share of
/// an allocation instead of a whole receive buffer.
const ARENA_LEN: usize = 256 * 1024;

/// Receives until `token` is cancelled, sending each datagram to `batcher`.
pub(crate) async fn receive_loop(
    socket: UdpSocket,
    batcher: mpsc::Sender<pb::Datagram>,
    metrics: Arc<Metrics>,
    token: CancellationToken,
) {
    let local = socket.local_addr().ok();
    let mut scratch = vec![0u8; RECV_BUF_LEN].into_boxed_slice();
    let mut arena = BytesMut::with_capacity(ARENA_LEN);
    let full = RateLimit::new(Duration::from_secs(10));
    loop {
        let (len, source) = tokio::select! {
            received = socket.recv_from(&mut scratch) => match received {
                Ok(received) => received,
                Err(error) => {
                    // ICMP errors and the like surface here on some systems; keep receiving.
                    tracing::debug!(?local, %error, "receive error");
                    continue;
                }
            },
            () = token.cancelled() => break,
        };
        metrics.datagrams_received.inc();
        metrics.bytes_received.inc_by(len as u64);
        metrics.sflow.observe([&scratch[..len]]);
        let payload = copy_out(&mut arena, &scratch[..len]);
        let datagram = to_proto(payload, source);
        if batcher.try_send(datagram).is_err() {
            metrics.dropped_queue_full.inc();
            if let Some(more) = full.check() {
                tracing::warn!(
                    ?local,
                    earlier_drops_not_logged = more,
                    "batch queue full: datagram dropped"
                );
            }
        }
    }
}

fn copy_out(arena: &mut BytesMut, data: &[u8]) -> Bytes {
    if arena.capacity() - arena.len() < data.len() {
        *arena = BytesMut::with_capacity(ARENA_LEN.max(data.len()));
    }
    arena.extend_from_slice(data);
    arena.split().freeze()
}

fn to_proto(payload: Bytes, source: SocketAddr) -> pb::Datagram {
    let received_unix_nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    proto::wire::Datagram {
        payload,
        source,
        received_unix_nanos,
    }
    .to_proto()
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

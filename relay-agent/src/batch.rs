//! Batching datagrams into frames, and handing each frame to every sink's queue.
//!
//! A batch is flushed when it reaches `batch_bytes` or `batch_delay` after its first datagram,
//! whichever comes first. Each batch is encoded once, into one frame shared (by reference
//! count) by all sinks. A sink whose queue is full loses that batch alone; the others are not
//! held back.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proto::pb;
use runtime::ratelimit::RateLimit;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics::{DropReason, Metrics, SinkMetrics};
use crate::receive::Chunk;

/// An encoded batch on its way to a sink.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    /// The agent's session.
    pub(crate) session: u64,
    /// The batch sequence number.
    pub(crate) sequence: u64,
    /// Datagrams in the batch.
    pub(crate) datagrams: u64,
    /// Length prefix and protobuf body.
    pub(crate) bytes: Bytes,
}

/// A sink's queue, as seen by the batcher.
#[derive(Debug)]
pub(crate) struct SinkQueue {
    pub(crate) name: String,
    pub(crate) queue: mpsc::Sender<Frame>,
    pub(crate) metrics: Arc<SinkMetrics>,
    pub(crate) full: RateLimit,
}

/// Batches datagrams from `input` until it closes, then flushes what is left and returns,
/// dropping the sink queues (which tells the sink links to finish).
pub(crate) async fn batch_loop(
    mut input: mpsc::Receiver<Chunk>,
    sinks: Vec<SinkQueue>,
    session: u64,
    batch_bytes: usize,
    batch_delay: Duration,
    compression: Option<i32>,
    metrics: Arc<Metrics>,
) {
    // The level was checked at start-up; should zstd still refuse it, batches go plain.
    let mut compressor = compression.and_then(|level| {
        proto::compression::Compressor::new(level)
            .inspect_err(
                |error| tracing::error!(%error, "zstd unavailable: batches go uncompressed"),
            )
            .ok()
    });
    let mut pending: Vec<pb::Datagram> = Vec::with_capacity(256);
    let mut pending_bytes = 0usize;
    let mut deadline: Option<Instant> = None;
    let mut sequence = 0u64;
    let mut incoming = Vec::with_capacity(256);
    loop {
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            n = input.recv_many(&mut incoming, 64) => {
                if n == 0 {
                    break;
                }
                for datagram in incoming.drain(..).flatten() {
                    if pending.is_empty() {
                        deadline = Some(Instant::now() + batch_delay);
                    }
                    pending_bytes += datagram.encoded_len_in_batch();
                    pending.push(datagram);
                    if pending_bytes >= batch_bytes {
                        sequence += 1;
                        flush(&mut pending, session, sequence, &sinks, compressor.as_mut(), &metrics);
                        pending_bytes = 0;
                        deadline = None;
                    }
                }
            }
            () = sleep => {
                sequence += 1;
                flush(&mut pending, session, sequence, &sinks, compressor.as_mut(), &metrics);
                pending_bytes = 0;
                deadline = None;
            }
        }
    }
    if !pending.is_empty() {
        sequence += 1;
        flush(
            &mut pending,
            session,
            sequence,
            &sinks,
            compressor.as_mut(),
            &metrics,
        );
    }
    tracing::debug!(batches = sequence, "batcher finished");
}

fn flush(
    pending: &mut Vec<pb::Datagram>,
    session: u64,
    sequence: u64,
    sinks: &[SinkQueue],
    compressor: Option<&mut proto::compression::Compressor>,
    metrics: &Metrics,
) {
    let datagrams = std::mem::take(pending);
    let count = datagrams.len() as u64;
    let mut batch = pb::Batch {
        session,
        sequence,
        datagrams,
        // Sent once as it is made: live. The link marks it catch-up should it be sent late or
        // again (`proto::wire::mark_catch_up`).
        timing: pb::Timing::Live.into(),
        ..Default::default()
    };
    let mut buf = BytesMut::new();
    let compressed = compressor.is_some_and(|compressor| {
        compressor
            .encode_frame(&mut batch, &mut buf)
            .inspect_err(|error| {
                tracing::warn!(%error, "batch compression failed: sent uncompressed");
            })
            .is_ok()
    });
    if !compressed {
        buf.clear();
        proto::wire::encode_frame(&batch, &mut buf);
    }
    metrics.frame_bytes.inc_by(buf.len() as u64);
    // The datagrams' payloads are now copied into the frame; hand their vector back for reuse.
    *pending = batch.datagrams;
    pending.clear();
    metrics.batches.inc();
    let frame = Frame {
        session,
        sequence,
        datagrams: count,
        bytes: buf.freeze(),
    };
    for sink in sinks {
        if sink.queue.try_send(frame.clone()).is_err() {
            sink.metrics
                .dropped(DropReason::SinkQueueFull)
                .inc_by(count);
            if let Some(more) = sink.full.check() {
                tracing::warn!(
                    sink = %sink.name,
                    dropped_datagrams = count,
                    earlier_drops_not_logged = more,
                    "sink intake full (its backlog or spool cannot keep up): batch dropped for this sink"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use proto::wire::{DEFAULT_MAX_FRAME_LEN, decode_frame};

    fn datagram(i: u8, len: usize) -> pb::Datagram {
        pb::Datagram {
            payload: Bytes::from(vec![i; len]),
            ..Default::default()
        }
    }

    fn decode(frame: &Frame) -> pb::Batch {
        let mut buf = BytesMut::from(&frame.bytes[..]);
        pb::Batch::decode(
            decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN)
                .unwrap()
                .unwrap(),
        )
        .unwrap()
    }

    fn setup(
        capacity: usize,
    ) -> (
        mpsc::Sender<Chunk>,
        mpsc::Receiver<Frame>,
        tokio::task::JoinHandle<()>,
        Arc<SinkMetrics>,
    ) {
        let (in_tx, in_rx) = mpsc::channel(1024);
        let (out_tx, out_rx) = mpsc::channel(capacity);
        let sink_metrics = Arc::new(SinkMetrics::default());
        let sinks = vec![SinkQueue {
            name: "test".into(),
            queue: out_tx,
            metrics: sink_metrics.clone(),
            full: RateLimit::new(Duration::from_secs(10)),
        }];
        let task = tokio::spawn(batch_loop(
            in_rx,
            sinks,
            9,
            4000,
            Duration::from_millis(5),
            None,
            Arc::default(),
        ));
        (in_tx, out_rx, task, sink_metrics)
    }

    #[tokio::test(start_paused = true)]
    async fn lone_datagram_waits_no_longer_than_the_delay() {
        let (tx, mut rx, _task, _) = setup(8);
        let start = Instant::now();
        tx.send(vec![datagram(1, 100)]).await.unwrap();
        let frame = rx.recv().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(5));
        let batch = decode(&frame);
        assert_eq!(
            (batch.session, batch.sequence, batch.datagrams.len()),
            (9, 1, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn full_batches_leave_at_once_in_order() {
        let (tx, mut rx, task, _) = setup(64);
        for i in 0..10u8 {
            tx.send(vec![datagram(i, 1000)]).await.unwrap();
        }
        drop(tx);
        task.await.unwrap();
        let mut seen = Vec::new();
        let mut sequences = Vec::new();
        while let Some(frame) = rx.recv().await {
            let batch = decode(&frame);
            sequences.push(batch.sequence);
            seen.extend(batch.datagrams.iter().map(|d| d.payload[0]));
        }
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(sequences, vec![1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn full_sink_queue_drops_and_counts() {
        let (tx, mut rx, task, metrics) = setup(1);
        for i in 0..12u8 {
            tx.send(vec![datagram(i, 1000)]).await.unwrap();
        }
        drop(tx);
        task.await.unwrap();
        assert!(rx.recv().await.is_some());
        assert!(rx.recv().await.is_none());
        assert_eq!(metrics.dropped(DropReason::SinkQueueFull).get(), 8);
    }
}

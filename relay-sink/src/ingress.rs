//! Where batches come in. Each transport (`quic`, `grpc`) turns authenticated agent
//! connections into calls of [`deliver`] (which hands the batch to
//! [`Replay`](crate::replay::Replay)) plus acknowledgements; this module holds what they share
//! on the way to replay, so QUIC and gRPC agents are treated alike: the counts, dropping
//! resends ([`crate::dedup`]), the per-agent limits ([`crate::limits`]) and pacing catch-up
//! ([`crate::catch_up`]).
//!
//! Who may connect is [`crate::admission`]'s, and how refusals and violations are counted and
//! logged [`crate::refusal`]'s.

pub(crate) mod grpc;
pub(crate) mod quic;

use std::collections::VecDeque;
use std::sync::Arc;

use proto::pb;

use crate::Shared;
use crate::catch_up::Paced;
use crate::dedup::Seen;
use crate::replay::Replaying;
use crate::status::Connection;

/// A batch handed to [`deliver`]: its acknowledgement, to send once `replaying` (if any) has
/// finished.
pub(crate) struct Delivery {
    pub(crate) ack: pb::Ack,
    /// `None` for a duplicate: already replayed, acknowledged at once.
    pub(crate) replaying: Option<Arc<Replaying>>,
}

impl Delivery {
    /// Waits until the batch has been replayed (cancel-safe: waiting again picks up).
    async fn wait_replayed(&self) {
        if let Some(replaying) = &self.replaying {
            replaying.finished().await;
        }
    }

    /// Whether the batch has been replayed.
    fn is_replayed(&self) -> bool {
        self.replaying.as_ref().is_none_or(|r| r.is_finished())
    }
}

/// Where a stream's acknowledgements go: QUIC's send stream, or a gRPC call's response
/// channel.
pub(crate) trait AckWriter {
    /// Writes `ack`. When that fails, the writer is closed from then on.
    async fn write(&mut self, ack: pb::Ack);

    /// Whether the agent no longer reads acknowledgements (a write failed, or its side is
    /// gone).
    fn is_closed(&self) -> bool;
}

/// Batches a stream has read and handed to replay, waiting for their acknowledgement, oldest
/// first: enough to keep an agent's window of batches moving, bounded so that a stalled
/// destination slows the agent down. Each is acknowledged once replayed; an acknowledgement
/// covers every batch of its session before it, so the batches found replayed together go in
/// one (with thousands of agents each sending a datagram at a time, an acknowledgement is a
/// packet, and a good part of the cost of a batch).
///
/// The stream's one task reads batches and writes acknowledgements: a batch costs one task's
/// wake-ups, not those of a reader and an acknowledging task. Both transports run it the
/// same way: [`can_acknowledge`](Self::can_acknowledge) guards [`ready`](Self::ready) beside
/// the read, [`hand_over`](Self::hand_over) delivers what was read, and
/// [`drain`](Self::drain) acknowledges the rest when the stream ends.
#[derive(Default)]
pub(crate) struct Unacknowledged {
    waiting: VecDeque<Delivery>,
}

impl Unacknowledged {
    /// Batches a stream may have waiting before it stops reading.
    const LIMIT: usize = 1024;

    /// Whether another batch may be read.
    pub(crate) fn has_room(&self) -> bool {
        self.waiting.len() < Self::LIMIT
    }

    /// Whether a batch waits for its acknowledgement.
    pub(crate) fn is_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Whether a batch waits for its acknowledgement and `to` still takes it.
    pub(crate) fn can_acknowledge(&self, to: &impl AckWriter) -> bool {
        !to.is_closed() && self.is_waiting()
    }

    /// Waits until `deliver` has handed a batch to replay (which may wait: a full replay
    /// queue, the catch-up pace), acknowledging to `to` meanwhile what is replayed meanwhile;
    /// then adds the batch.
    pub(crate) async fn hand_over(
        &mut self,
        deliver: impl Future<Output = Delivery>,
        to: &mut impl AckWriter,
    ) {
        tokio::pin!(deliver);
        let delivery = loop {
            tokio::select! {
                biased;
                delivery = &mut deliver => break delivery,
                ack = self.ready(), if self.can_acknowledge(to) => to.write(ack).await,
            }
        };
        self.waiting.push_back(delivery);
    }

    /// Acknowledges to `to` every batch still waiting, each as it is replayed, while `to`
    /// takes them: what a stream read is acknowledged before it ends.
    pub(crate) async fn drain(&mut self, to: &mut impl AckWriter) {
        while self.can_acknowledge(to) {
            let ack = self.ready().await;
            to.write(ack).await;
        }
    }

    /// Waits until the oldest waiting batch has been replayed, and takes it and the batches
    /// after it of the same session replayed by then; the acknowledgement that covers them.
    /// Cancel-safe: nothing is taken until the wait is over. Call only when
    /// [`is_waiting`](Self::is_waiting).
    pub(crate) async fn ready(&mut self) -> pb::Ack {
        if let Some(oldest) = self.waiting.front() {
            oldest.wait_replayed().await;
        }
        let mut ack = self.waiting.pop_front().expect("a batch waits").ack;
        while let Some(next) = self.waiting.front() {
            if next.ack.session != ack.session || !next.is_replayed() {
                break;
            }
            ack = self.waiting.pop_front().expect("a batch waits").ack;
        }
        ack
    }
}

/// Hands a batch from an agent's `connection` to replay (each destination its share: the
/// site a route's `sites` match is the agent's certificate name), unless this agent's session has
/// already had it replayed (a resend after a reconnect), which is counted and not replayed
/// again.
pub(crate) async fn deliver(
    shared: &Shared,
    connection: &Connection,
    mut batch: pb::Batch,
) -> Delivery {
    let agent = &*connection.agent;
    let ack = pb::Ack {
        session: batch.session,
        sequence: batch.sequence,
    };
    let datagrams = batch.datagrams.len() as u64;
    let bytes = batch.datagrams.iter().map(|d| d.payload.len() as u64).sum();
    let metrics = &shared.metrics;
    metrics.batches_received.inc();
    metrics.datagrams_received.inc_by(datagrams);
    metrics.bytes_received.inc_by(bytes);
    connection.received(datagrams, bytes);
    if let Seen::Before(original) = shared.replayed.check(agent, ack.session, ack.sequence) {
        metrics.batches_duplicate.inc();
        metrics.datagrams_duplicate.inc_by(datagrams);
        tracing::debug!(%agent, session = ack.session, sequence = ack.sequence, "duplicate batch (already replayed): acknowledged, not replayed");
        // Acknowledged once the session's latest replay (which includes the original, or
        // follows it) is done, so an acknowledgement still means "replayed".
        return Delivery {
            ack,
            replaying: original,
        };
    }
    tracing::trace!(%agent, sequence = ack.sequence, datagrams, "batch");
    // Only a batch that is to be replayed spends the agent's rate (a resend is dropped whole).
    let dropped = shared
        .paces
        .limit(&shared.config, &connection.agent, &mut batch);
    if dropped.too_large + dropped.rate_limited > 0 {
        connection.dropped(dropped.too_large, dropped.rate_limited);
    }
    metrics
        .sflow
        .observe(batch.datagrams.iter().map(|d| &d.payload[..]));
    if let Some(sflow_metrics) = &shared.sflow_metrics {
        sflow_metrics.observe(&connection.agent, &batch.datagrams);
    }
    let replaying = match Paced::of(&batch) {
        None => shared.replay.submit(batch, agent, &connection.lane).await,
        Some(paced) => catch_up(shared, connection, paced, batch).await,
    };
    shared
        .replayed
        .replaying(agent, ack.session, ack.sequence, &replaying);
    Delivery {
        ack,
        replaying: Some(replaying),
    }
}

/// Hands a catch-up batch to replay at the catch-up pace, waiting on this connection alone:
/// in slices of at most the pace's burst, each once the pace allows it, so a collector gets
/// no larger burst from a draining backlog than the pace's (other agents' batches go between
/// the slices). Returns the last slice's replay: a destination replays in order, so when it
/// is done, so is the batch.
async fn catch_up(
    shared: &Shared,
    connection: &Connection,
    paced: Paced,
    mut batch: pb::Batch,
) -> Arc<Replaying> {
    let metrics = &shared.metrics;
    metrics.catch_up(paced).inc_by(batch.datagrams.len() as u64);
    let live = batch.live_datagrams_per_second;
    let slice = shared.catch_up.burst();
    let mut rest = std::mem::take(&mut batch.datagrams);
    loop {
        let tail = rest.split_off(slice.min(rest.len()));
        let datagrams = std::mem::replace(&mut rest, tail);
        let wait = shared.catch_up.wait_for(
            Some(paced),
            live,
            &connection.catch_up,
            datagrams.len() as u64,
        );
        if !wait.is_zero() {
            metrics.catch_up_wait_seconds.inc_by(wait.as_secs_f64());
            tokio::time::sleep(wait).await;
        }
        let part = pb::Batch {
            datagrams,
            ..batch.clone()
        };
        let replaying = shared
            .replay
            .submit(part, &connection.agent, &connection.lane)
            .await;
        if rest.is_empty() {
            return replaying;
        }
    }
}

//! Batching datagrams into frames, and handing each frame to its sinks' queues.
//!
//! Sinks whose routes carry the same datagrams (their `agents` filters are the same; most
//! often: none) share a *lane*: one pending batch, one session and one run of sequence
//! numbers, so each sink's sequence stays contiguous and a frame is encoded once for all of
//! a lane's sinks, shared by reference count. A datagram's sFlow header is parsed once (only
//! when some lane filters) and matched once per lane; it goes to a lane by reference count
//! too, never copied. What a lane's filter keeps out is counted per sink
//! (`relay_agent_datagrams_filtered_total`) and never leaves the site.
//!
//! A lane's batch is flushed when it reaches `batch_bytes` or `batch_delay` after its first
//! datagram, whichever comes first. A sink whose queue is full loses that batch alone; the
//! others are not held back. When the routes change (a reload, or a sink's `not-after`
//! passing), every lane flushes what it holds under the old routes and the lanes are formed
//! again: the new routes apply from the next batch, and a lane whose filter did not change
//! keeps its session.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proto::pb;
use runtime::ratelimit::RateLimit;
use runtime::route::Route;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::metrics::{DropReason, Metrics, SinkMetrics};
use crate::receive::Chunk;

/// How much earlier than `batch_delay` after its first datagram a batch is due. tokio's
/// timers fire on the first millisecond tick at or after their deadline, and the wait for
/// events rounds its timeout up to a millisecond as well: measured on a 2-core VM, a 5 ms
/// sleep woke 1.2 ms late at the median (1.5 ms at the 90th percentile), so a lone datagram
/// waited about 6.2 ms under a 5 ms `batch-delay`. Due a millisecond early, batches leave
/// within about 0.2 ms of the delay, either side.
const TIMER_SLACK: Duration = Duration::from_millis(1);

/// Each sink's route, in the order of the sinks; `None` for a sink whose feed has ended.
pub(crate) type Routes = Arc<Vec<Option<Route>>>;

/// An encoded batch on its way to a sink.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    /// The lane's session.
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

/// How batches are made.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The first lane's session (further lanes draw theirs at random): sinks de-duplicate
    /// resends within a session.
    pub(crate) session: u64,
    pub(crate) batch_bytes: usize,
    pub(crate) batch_delay: Duration,
}

/// Sinks that take the same datagrams, and the batch being made for them.
#[derive(Debug)]
struct Lane {
    filter: Route,
    /// Indices into the sinks.
    sinks: Vec<usize>,
    session: u64,
    sequence: u64,
    pending: Vec<pb::Datagram>,
    pending_bytes: usize,
    /// When the pending batch is due: `batch_delay` less [`TIMER_SLACK`] after its first
    /// datagram.
    deadline: Option<Instant>,
    /// Datagrams the filter kept out since they were last counted.
    filtered: u64,
}

/// The lanes, and what a flush needs.
struct Batcher {
    lanes: Vec<Lane>,
    /// Whether any lane filters (else no header is parsed).
    filtering: bool,
    sinks: Vec<SinkQueue>,
    settings: Settings,
    metrics: Arc<Metrics>,
    /// The session of the next lane made (the first one's is given).
    next_session: Option<u64>,
}

/// Batches datagrams from `input` until it closes, then flushes what is left and returns,
/// dropping the sink queues (which tells the sink links to finish). `routes` says which
/// datagrams each sink takes; a change applies from the next batch.
pub(crate) async fn batch_loop(
    mut input: mpsc::Receiver<Chunk>,
    sinks: Vec<SinkQueue>,
    mut routes: watch::Receiver<Routes>,
    settings: Settings,
    metrics: Arc<Metrics>,
) {
    let mut batcher = Batcher {
        lanes: Vec::new(),
        filtering: false,
        next_session: Some(settings.session),
        sinks,
        settings,
        metrics,
    };
    batcher.regroup(&routes.borrow_and_update());
    let mut incoming = Vec::with_capacity(256);
    loop {
        let deadline = batcher.lanes.iter().filter_map(|lane| lane.deadline).min();
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
                    batcher.add(datagram);
                }
                batcher.count_filtered();
            }
            () = sleep => batcher.flush_due(Instant::now()),
            Ok(()) = routes.changed() => {
                batcher.flush_all();
                batcher.regroup(&routes.borrow_and_update());
            }
        }
    }
    batcher.flush_all();
    let batches: u64 = batcher.lanes.iter().map(|lane| lane.sequence).sum();
    tracing::debug!(batches, lanes = batcher.lanes.len(), "batcher finished");
}

impl Batcher {
    /// Forms the lanes for `routes`: one per distinct filter among the sinks whose feed goes
    /// on. A lane whose filter was there before keeps its session and sequence. Call with
    /// every lane flushed.
    fn regroup(&mut self, routes: &[Option<Route>]) {
        let mut old = std::mem::take(&mut self.lanes);
        for (index, route) in routes.iter().enumerate() {
            let Some(route) = route else { continue };
            if let Some(lane) = self.lanes.iter_mut().find(|l| l.filter.same_filter(route)) {
                lane.sinks.push(index);
                continue;
            }
            let lane = match old.iter().position(|l| l.filter.same_filter(route)) {
                Some(at) => {
                    let mut lane = old.swap_remove(at);
                    lane.sinks.clear();
                    lane
                }
                None => self.new_lane(route),
            };
            self.lanes.push(Lane {
                sinks: vec![index],
                ..lane
            });
        }
        self.filtering = self.lanes.iter().any(|lane| lane.filter.is_filtered());
    }

    fn new_lane(&mut self, route: &Route) -> Lane {
        Lane {
            filter: route.clone(),
            sinks: Vec::new(),
            session: self.next_session.take().unwrap_or_else(rand::random),
            sequence: 0,
            pending: Vec::with_capacity(256),
            pending_bytes: 0,
            deadline: None,
            filtered: 0,
        }
    }

    /// Adds a datagram to every lane whose filter carries it, flushing the lanes it fills.
    fn add(&mut self, datagram: pb::Datagram) {
        let header = self
            .filtering
            .then(|| proto::sflow::parse_header(&datagram.payload));
        let last = self.lanes.len().saturating_sub(1);
        let mut datagram = Some(datagram);
        for at in 0..self.lanes.len() {
            let lane = &mut self.lanes[at];
            if let Some(header) = &header
                && !lane.filter.matches(header.as_ref(), None)
            {
                lane.filtered += 1;
                continue;
            }
            // The last lane takes the datagram itself; the others share its payload.
            let datagram = if at == last {
                datagram.take()
            } else {
                datagram.clone()
            };
            let Some(datagram) = datagram else { continue };
            if lane.pending.is_empty() {
                let delay = self.settings.batch_delay.saturating_sub(TIMER_SLACK);
                lane.deadline = Some(Instant::now() + delay);
            }
            lane.pending_bytes += datagram.encoded_len_in_batch();
            lane.pending.push(datagram);
            if lane.pending_bytes >= self.settings.batch_bytes {
                self.flush(at);
            }
        }
    }

    /// Counts what each lane's filter kept out, against each of its sinks.
    fn count_filtered(&mut self) {
        for lane in self.lanes.iter_mut().filter(|lane| lane.filtered > 0) {
            for &sink in &lane.sinks {
                self.sinks[sink]
                    .metrics
                    .datagrams_filtered
                    .inc_by(lane.filtered);
            }
            lane.filtered = 0;
        }
    }

    /// Flushes the lanes whose delay is over at `now`.
    fn flush_due(&mut self, now: Instant) {
        for at in 0..self.lanes.len() {
            if self.lanes[at]
                .deadline
                .is_some_and(|deadline| deadline <= now)
            {
                self.flush(at);
            }
        }
    }

    /// Flushes every lane that holds something.
    fn flush_all(&mut self) {
        self.count_filtered();
        for at in 0..self.lanes.len() {
            if !self.lanes[at].pending.is_empty() {
                self.flush(at);
            }
        }
    }

    /// Encodes lane `at`'s batch once and hands the frame to each of its sinks.
    fn flush(&mut self, at: usize) {
        let lane = &mut self.lanes[at];
        lane.sequence += 1;
        lane.pending_bytes = 0;
        lane.deadline = None;
        let frame = encode(
            &mut lane.pending,
            lane.session,
            lane.sequence,
            &self.metrics,
        );
        for &sink in &lane.sinks {
            offer(&self.sinks[sink], frame.clone());
        }
    }
}

/// Encodes `pending` as the batch (`session`, `sequence`), plain (each link compresses what
/// it sends, against its connection's history), leaving `pending` empty for reuse.
fn encode(
    pending: &mut Vec<pb::Datagram>,
    session: u64,
    sequence: u64,
    metrics: &Metrics,
) -> Frame {
    let datagrams = std::mem::take(pending);
    let count = datagrams.len() as u64;
    let batch = pb::Batch {
        session,
        sequence,
        datagrams,
        // Sent once as it is made: live. The link marks it catch-up should it be sent late or
        // again (`proto::wire::mark_catch_up`).
        timing: pb::Timing::Live.into(),
        ..Default::default()
    };
    let mut buf = BytesMut::with_capacity(
        proto::wire::FRAME_HEADER_LEN + prost::Message::encoded_len(&batch),
    );
    proto::wire::encode_frame(&batch, &mut buf);
    // The datagrams' payloads are now copied into the frame; hand their vector back for reuse.
    *pending = batch.datagrams;
    pending.clear();
    metrics.batches.inc();
    Frame {
        session,
        sequence,
        datagrams: count,
        bytes: buf.freeze(),
    }
}

/// Hands `frame` to `sink`'s queue; a full queue drops it for this sink, counted and logged.
/// A closed one is a sink whose feed has ended: nothing to count.
fn offer(sink: &SinkQueue, frame: Frame) {
    let count = frame.datagrams;
    if let Err(mpsc::error::TrySendError::Full(_)) = sink.queue.try_send(frame) {
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
        let (_routes, routes) = watch::channel(Arc::new(vec![Some(Route::default())]));
        let task = tokio::spawn(batch_loop(in_rx, sinks, routes, settings(), Arc::default()));
        (in_tx, out_rx, task, sink_metrics)
    }

    fn settings() -> Settings {
        Settings {
            session: 9,
            batch_bytes: 4000,
            batch_delay: Duration::from_millis(5),
        }
    }

    fn sflow(agent: &str, sub_agent: u32, sequence: u32) -> pb::Datagram {
        let mut header = proto::sflow::Header::from_agent(agent.parse().unwrap());
        header.sub_agent = sub_agent;
        header.sequence = sequence;
        pb::Datagram {
            payload: Bytes::from(header.to_bytes()),
            ..Default::default()
        }
    }

    fn route(agents: &[&str]) -> Option<Route> {
        Some(
            Route::try_from(&runtime::route::RouteConfig {
                agents: agents.iter().map(ToString::to_string).collect(),
                ..Default::default()
            })
            .unwrap(),
        )
    }

    /// Three sinks (two filtered alike, one not) fed the same datagrams; what each received.
    struct Lanes {
        input: mpsc::Sender<Chunk>,
        outputs: Vec<mpsc::Receiver<Frame>>,
        metrics: Vec<Arc<SinkMetrics>>,
        routes: watch::Sender<Routes>,
        task: tokio::task::JoinHandle<()>,
    }

    fn lanes(routes: Vec<Option<Route>>) -> Lanes {
        let (input, in_rx) = mpsc::channel(1024);
        let mut outputs = Vec::new();
        let mut metrics = Vec::new();
        let mut sinks = Vec::new();
        for i in 0..routes.len() {
            let (tx, rx) = mpsc::channel(1024);
            let m = Arc::new(SinkMetrics::default());
            sinks.push(SinkQueue {
                name: format!("sink-{i}"),
                queue: tx,
                metrics: m.clone(),
                full: RateLimit::new(Duration::from_secs(10)),
            });
            outputs.push(rx);
            metrics.push(m);
        }
        let (routes, rx) = watch::channel(Arc::new(routes));
        let task = tokio::spawn(batch_loop(in_rx, sinks, rx, settings(), Arc::default()));
        Lanes {
            input,
            outputs,
            metrics,
            routes,
            task,
        }
    }

    /// Every batch a sink received, decoded.
    fn received(output: &mut mpsc::Receiver<Frame>) -> Vec<pb::Batch> {
        let mut batches = Vec::new();
        while let Ok(frame) = output.try_recv() {
            batches.push(decode(&frame));
        }
        batches
    }

    fn sequences(batches: &[pb::Batch]) -> Vec<u32> {
        (batches.iter().flat_map(|b| &b.datagrams))
            .map(|d| proto::sflow::parse_header(&d.payload).unwrap().sequence)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn lone_datagram_waits_no_longer_than_the_delay() {
        let (tx, mut rx, _task, _) = setup(8);
        let start = Instant::now();
        tx.send(vec![datagram(1, 100)]).await.unwrap();
        let frame = rx.recv().await.unwrap();
        // The timer is asked for a millisecond early (real timers fire late by about as
        // much); a paused clock fires it on time.
        assert_eq!(start.elapsed(), Duration::from_millis(5) - TIMER_SLACK);
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

    #[tokio::test(start_paused = true)]
    async fn each_filter_makes_one_lane_with_its_own_session_and_contiguous_sequences() {
        let filtered = route(&["10.1.0.0/24", "!10.1.0.99"]);
        let mut l = lanes(vec![filtered.clone(), Some(Route::default()), filtered]);
        let agents = ["10.1.0.1", "10.1.0.99", "10.2.0.1", "2001:db8::1"];
        for i in 0..40u32 {
            let agent = agents[i as usize % agents.len()];
            l.input.send(vec![sflow(agent, i % 2, i)]).await.unwrap();
        }
        drop(l.input);
        l.task.await.unwrap();
        let got: Vec<Vec<pb::Batch>> = l.outputs.iter_mut().map(received).collect();
        let included: Vec<u32> = (0..40).filter(|i| i % 4 == 0).collect();
        assert_eq!(sequences(&got[0]), included, "only 10.1.0.0/24 less .99");
        assert_eq!(sequences(&got[1]), (0..40).collect::<Vec<_>>());
        // Sinks 0 and 2 share a lane: the very same frames.
        assert_eq!(got[0], got[2]);
        for batches in &got {
            let numbers: Vec<u64> = batches.iter().map(|b| b.sequence).collect();
            assert_eq!(numbers, (1..=batches.len() as u64).collect::<Vec<_>>());
        }
        assert_ne!(got[0][0].session, got[1][0].session, "a session per lane");
        assert_eq!(l.metrics[0].datagrams_filtered.get(), 30);
        assert_eq!(l.metrics[2].datagrams_filtered.get(), 30);
        assert_eq!(l.metrics[1].datagrams_filtered.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_filtered_lane_takes_no_datagram_that_is_not_sflow() {
        let mut l = lanes(vec![route(&["!10.9.0.0/16"]), Some(Route::default())]);
        l.input.send(vec![datagram(1, 100)]).await.unwrap();
        drop(l.input);
        l.task.await.unwrap();
        assert!(received(&mut l.outputs[0]).is_empty());
        assert_eq!(received(&mut l.outputs[1]).len(), 1);
        assert_eq!(l.metrics[0].datagrams_filtered.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn new_routes_apply_from_the_next_batch_and_unchanged_lanes_keep_their_session() {
        let mut l = lanes(vec![route(&["10.1.0.1"]), Some(Route::default())]);
        l.input.send(vec![sflow("10.1.0.1", 0, 1)]).await.unwrap();
        l.input.send(vec![sflow("10.1.0.2", 0, 2)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        // Changed before the 5 ms delay is over: what is pending goes under the old routes.
        l.routes
            .send(Arc::new(vec![route(&["10.1.0.2"]), Some(Route::default())]))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        l.input.send(vec![sflow("10.1.0.1", 0, 3)]).await.unwrap();
        l.input.send(vec![sflow("10.1.0.2", 0, 4)]).await.unwrap();
        // The feed of sink 0 ends.
        tokio::time::sleep(Duration::from_millis(10)).await;
        l.routes
            .send(Arc::new(vec![None, Some(Route::default())]))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        l.input.send(vec![sflow("10.1.0.2", 0, 5)]).await.unwrap();
        drop(l.input);
        l.task.await.unwrap();
        let filtered = received(&mut l.outputs[0]);
        assert_eq!(sequences(&filtered), [1, 4]);
        assert_eq!(
            filtered.len(),
            2,
            "the pending batch was flushed at the change"
        );
        let all = received(&mut l.outputs[1]);
        assert_eq!(sequences(&all), [1, 2, 3, 4, 5]);
        assert!(all.iter().all(|b| b.session == all[0].session));
        let numbers: Vec<u64> = all.iter().map(|b| b.sequence).collect();
        assert_eq!(numbers, (1..=all.len() as u64).collect::<Vec<_>>());
    }
}

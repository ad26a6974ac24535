//! [`Link`] driven over in-memory sessions with tokio's clock paused: the order of frames and
//! their acknowledgement, the window, resending after a cut, and `auto` going back from gRPC
//! to QUIC. Each test plays the sink: it reads the frames the link sends, acknowledges them,
//! cuts the connection, and checks what arrived.

use std::sync::Mutex;

use prost::Message;
use proto::pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::*;
use crate::backlog::Limits;
use crate::batch::Frame;

/// The agent session the test batches belong to.
const AGENT_SESSION: u64 = 7;

/// Long enough for anything the link would do on its own (with the clock paused it costs
/// nothing): a frame that has not come by then is not coming.
const PATIENCE: Duration = Duration::from_secs(60);

fn sink(transport: TransportMode) -> SinkConfig {
    SinkConfig {
        addr: "sink.example.com:4433".into(),
        server_name: "sink.example.com".into(),
        ca: "ca.pem".into(),
        cert: "agent.pem".into(),
        key: "agent.key".into(),
        backlog_bytes: 1 << 20,
        transport,
        route: runtime::route::Route::default(),
    }
}

/// Batch `sequence` as the batcher makes it: one datagram, 1-byte sequence numbers keep every
/// frame the same length.
fn frame(sequence: u64) -> Frame {
    let batch = pb::Batch {
        session: AGENT_SESSION,
        sequence,
        ..Default::default()
    };
    let mut bytes = bytes::BytesMut::new();
    proto::wire::encode_frame(&batch, &mut bytes);
    Frame {
        session: AGENT_SESSION,
        sequence,
        datagrams: 1,
        bytes: bytes.freeze(),
    }
}

/// The sink's end of an in-memory session.
struct Peer {
    frames: mpsc::UnboundedReceiver<Bytes>,
    acks: watch::Sender<Acked>,
    cut: watch::Sender<bool>,
}

/// A batch as the sink received it.
#[derive(Debug, PartialEq, Eq)]
struct Received {
    sequence: u64,
    catch_up: bool,
}

impl Peer {
    /// The next `n` batches, in the order they came.
    async fn take(&mut self, n: usize) -> Vec<Received> {
        let mut received = Vec::new();
        for _ in 0..n {
            let frame = tokio::time::timeout(PATIENCE, self.frames.recv())
                .await
                .unwrap_or_else(|_| panic!("batch {} of {n} never came", received.len() + 1))
                .expect("the link finished the stream early");
            let batch =
                pb::Batch::decode(&frame[proto::wire::FRAME_HEADER_LEN..]).expect("a batch frame");
            assert_eq!(batch.session, AGENT_SESSION);
            received.push(Received {
                sequence: batch.sequence,
                catch_up: batch.timing == pb::Timing::CatchUp as i32,
            });
        }
        received
    }

    /// The sequence numbers of the next `n` batches.
    async fn sequences(&mut self, n: usize) -> Vec<u64> {
        self.take(n).await.iter().map(|r| r.sequence).collect()
    }

    /// Asserts that no batch comes for a good while.
    async fn nothing_more(&mut self) {
        let next = tokio::time::timeout(PATIENCE, self.frames.recv()).await;
        assert!(next.is_err(), "the link sent more: {next:?}");
    }

    /// Waits for the link to finish the stream (nothing more will come on it).
    async fn finished(&mut self) {
        let next = tokio::time::timeout(PATIENCE, self.frames.recv()).await;
        assert!(
            matches!(next, Ok(None)),
            "expected the stream finished: {next:?}"
        );
    }

    /// Acknowledges everything through batch `sequence`.
    fn ack(&self, sequence: u64) {
        self.acks.send_replace(Some((AGENT_SESSION, sequence)));
    }

    /// Breaks the connection, as a network failure would.
    fn cut(&self) {
        self.cut.send_replace(true);
    }
}

/// The agent's end of an in-memory session.
struct Memory {
    transport: Transport,
    sink: SinkConfig,
    /// `None` once finished.
    frames: Option<mpsc::UnboundedSender<Bytes>>,
    acked: watch::Receiver<Acked>,
    cut: watch::Receiver<bool>,
}

impl Memory {
    fn lost(&self) -> TransportError {
        TransportError::new(
            FailureKind::Unreachable,
            self.transport,
            &self.sink,
            "the test cut the connection",
        )
    }
}

impl Wire for Memory {
    fn remote(&self) -> SocketAddr {
        "192.0.2.1:4433".parse().expect("an address")
    }

    fn peer_chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        None
    }

    fn accepts(&self) -> Accepts {
        // The frames go as they are: these links have no compressor.
        Accepts::ZstdHistory
    }

    fn acked(&self) -> watch::Receiver<Acked> {
        self.acked.clone()
    }

    fn send(&mut self, frame: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            if *self.cut.borrow() {
                return Err(self.lost());
            }
            let frames = self.frames.as_ref().expect("no frame after finish");
            frames.send(frame).map_err(|_| self.lost())
        })
    }

    fn broken(&self) -> BoxFuture<'_, TransportError> {
        let mut cut = self.cut.clone();
        Box::pin(async move {
            // A peer dropped is a cut too.
            let _ = cut.wait_for(|cut| *cut).await;
            self.lost()
        })
    }

    fn finish(&mut self) {
        self.frames = None;
    }

    fn close(self: Box<Self>, _reason: &str) {}
}

/// A session over `transport` and the sink's end of it.
fn pair(transport: Transport, mode: TransportMode) -> (Session, Peer) {
    let (frames_tx, frames) = mpsc::unbounded_channel();
    let (acks, acked) = watch::channel(Acked::default());
    let (cut, cut_rx) = watch::channel(false);
    let memory = Memory {
        transport,
        sink: sink(mode),
        frames: Some(frames_tx),
        acked,
        cut: cut_rx,
    };
    (
        Session::new(transport, Box::new(memory)),
        Peer { frames, acks, cut },
    )
}

/// One transport's connection attempts, in order: the sessions to open, or the failures;
/// once they are used up, nothing is listening.
struct Attempts {
    transport: Transport,
    sink: SinkConfig,
    next: Mutex<VecDeque<Option<Session>>>,
}

impl Dial for Attempts {
    fn connect(&self, timeout: Duration) -> BoxFuture<'_, Result<Session, TransportError>> {
        let next = self
            .next
            .lock()
            .expect("not poisoned")
            .pop_front()
            .flatten();
        Box::pin(async move {
            next.ok_or_else(|| {
                TransportError::new(
                    FailureKind::Timeout,
                    self.transport,
                    &self.sink,
                    format_args!("no handshake within {timeout:?}"),
                )
            })
        })
    }
}

/// A link to a sink in `mode`, its window `window` batches of the test frames; QUIC opens
/// `quic` in turn (`None`: fails), gRPC `grpc`.
struct Harness {
    backlog: Arc<Backlog>,
    metrics: Arc<SinkMetrics>,
    link: JoinHandle<()>,
}

impl Harness {
    fn start(
        mode: TransportMode,
        window: usize,
        quic: Vec<Option<Session>>,
        grpc: Vec<Option<Session>>,
        backlog_from: std::ops::RangeInclusive<u64>,
    ) -> Self {
        let metrics = Arc::new(SinkMetrics::default());
        let limits = Limits {
            memory_bytes: 1 << 20,
            spool_max_bytes: u64::MAX,
            spool_max_age: Duration::from_secs(3600),
        };
        let backlog = Arc::new(
            Backlog::open("sink.example.com:4433", None, limits, metrics.clone())
                .expect("an in-memory backlog"),
        );
        for sequence in backlog_from {
            backlog.append(frame(sequence));
        }
        let attempts = |transport, sessions: Vec<Option<Session>>| {
            Arc::new(Attempts {
                transport,
                sink: sink(mode),
                next: Mutex::new(sessions.into()),
            })
        };
        let link = Link {
            dialer: Dialer {
                sink: sink(mode),
                quic: attempts(Transport::Quic, quic),
                grpc: attempts(Transport::Grpc, grpc),
                metrics: metrics.clone(),
                connect_timeout: Duration::from_secs(5),
                quic_fallback_after: Duration::from_secs(3),
                quic_retry_interval: Duration::from_secs(30),
            },
            backlog: backlog.clone(),
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(2)),
            window_bytes: window * frame(1).bytes.len(),
            released: 0,
            sent_through: 0,
            live_rate: LiveRate::default(),
            compressor: None,
            frame_bytes: prometheus::IntCounter::new("frame_bytes", "test").expect("a counter"),
        };
        Self {
            backlog,
            metrics,
            link: tokio::spawn(link.run()),
        }
    }

    /// Batches still held by the backlog (not yet acknowledged).
    fn pending(&self) -> u64 {
        self.backlog.pending().0
    }

    /// Waits until the backlog holds `n` batches.
    async fn until_pending(&self, n: u64) {
        let deadline = Instant::now() + PATIENCE;
        while self.pending() != n {
            assert!(
                Instant::now() < deadline,
                "backlog holds {} batches, not {n}",
                self.pending()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Closes the backlog (the agent shuts down) and waits for the link to end.
    async fn shut_down(self) -> Arc<SinkMetrics> {
        self.backlog.close();
        tokio::time::timeout(PATIENCE, self.link)
            .await
            .expect("the link ends once everything is acknowledged")
            .expect("the link does not panic");
        assert_eq!(
            self.backlog.pending().0,
            0,
            "everything acknowledged and released"
        );
        self.metrics
    }
}

#[tokio::test(start_paused = true)]
async fn batches_go_in_order_and_acknowledged_ones_are_released() {
    let (session, mut sink) = pair(Transport::Quic, TransportMode::Quic);
    let link = Harness::start(TransportMode::Quic, 100, vec![Some(session)], vec![], 1..=5);
    assert_eq!(sink.sequences(5).await, [1, 2, 3, 4, 5]);
    sink.ack(3);
    link.until_pending(2).await;
    link.backlog.append(frame(6));
    assert_eq!(sink.sequences(1).await, [6]);
    sink.ack(6);
    link.until_pending(0).await;
    let metrics = link.shut_down().await;
    sink.finished().await;
    assert_eq!(metrics.batches_sent.get(), 6);
    assert_eq!(metrics.batches_acknowledged.get(), 6);
    assert_eq!(metrics.batches_resent.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn after_a_cut_what_was_not_acknowledged_is_sent_again_and_nothing_is_lost() {
    let (first, mut sink) = pair(Transport::Quic, TransportMode::Quic);
    let (second, mut sink_again) = pair(Transport::Quic, TransportMode::Quic);
    let link = Harness::start(
        TransportMode::Quic,
        100,
        vec![Some(first), Some(second)],
        vec![],
        1..=10,
    );
    let mut arrived = sink.sequences(10).await;
    assert_eq!(arrived, (1..=10).collect::<Vec<_>>());
    sink.ack(4);
    link.until_pending(6).await;
    sink.cut();

    // The next connection starts at the oldest unacknowledged batch, marked catch-up.
    let resent = sink_again.take(6).await;
    assert_eq!(
        resent,
        (5..=10)
            .map(|sequence| Received {
                sequence,
                catch_up: true
            })
            .collect::<Vec<_>>()
    );
    link.backlog.append(frame(11));
    link.backlog.append(frame(12));
    assert_eq!(sink_again.sequences(2).await, [11, 12]);
    sink_again.ack(12);
    arrived.extend(resent.iter().map(|r| r.sequence));
    arrived.extend([11, 12]);

    let metrics = link.shut_down().await;
    // Every batch arrived; the only ones twice are those unacknowledged at the cut.
    let mut once = arrived.clone();
    once.sort_unstable();
    once.dedup();
    assert_eq!(once, (1..=12).collect::<Vec<_>>());
    let twice: Vec<u64> = once
        .iter()
        .copied()
        .filter(|s| arrived.iter().filter(|a| *a == s).count() > 1)
        .collect();
    assert_eq!(twice, [5, 6, 7, 8, 9, 10]);
    assert_eq!(metrics.batches_resent.get(), 6);
    assert_eq!(metrics.reconnects.get(), 1);
    assert_eq!(metrics.batches_acknowledged.get(), 12);
}

#[tokio::test(start_paused = true)]
async fn a_full_window_waits_for_an_acknowledgement() {
    let (session, mut sink) = pair(Transport::Quic, TransportMode::Quic);
    let link = Harness::start(TransportMode::Quic, 3, vec![Some(session)], vec![], 1..=8);
    assert_eq!(sink.sequences(3).await, [1, 2, 3]);
    sink.nothing_more().await;
    sink.ack(1);
    assert_eq!(sink.sequences(1).await, [4]);
    sink.nothing_more().await;
    sink.ack(4);
    assert_eq!(sink.sequences(3).await, [5, 6, 7]);
    sink.nothing_more().await;
    sink.ack(7);
    assert_eq!(sink.sequences(1).await, [8]);
    sink.ack(8);
    let metrics = link.shut_down().await;
    assert_eq!(metrics.batches_sent.get(), 8, "none sent twice");
}

#[tokio::test(start_paused = true)]
async fn auto_goes_back_to_quic_once_it_works_again() {
    let (grpc, mut over_grpc) = pair(Transport::Grpc, TransportMode::Auto);
    let (quic, mut over_quic) = pair(Transport::Quic, TransportMode::Auto);
    // QUIC fails first, and works at the next attempt (the link's retry on gRPC).
    let link = Harness::start(
        TransportMode::Auto,
        100,
        vec![None, Some(quic)],
        vec![Some(grpc)],
        1..=5,
    );
    assert_eq!(over_grpc.sequences(5).await, [1, 2, 3, 4, 5]);
    assert_eq!(link.metrics.transport(), InUse::Grpc);
    over_grpc.ack(3);
    // The retry finds QUIC: nothing more goes on gRPC, which has a while to acknowledge the
    // rest; it acknowledges only 4.
    over_grpc.finished().await;
    over_grpc.ack(4);
    // The batch gRPC did not acknowledge goes again over QUIC, then the new ones.
    assert_eq!(
        over_quic.take(1).await,
        [Received {
            sequence: 5,
            catch_up: true
        }]
    );
    assert_eq!(link.metrics.transport(), InUse::Quic);
    link.backlog.append(frame(6));
    assert_eq!(over_quic.sequences(1).await, [6]);
    over_quic.ack(6);
    let metrics = link.shut_down().await;
    assert_eq!(metrics.fallbacks_to_grpc.get(), 1);
    assert_eq!(metrics.returns_to_quic.get(), 1);
    assert_eq!(metrics.batches_resent.get(), 1);
    assert_eq!(metrics.batches_acknowledged.get(), 6);
}

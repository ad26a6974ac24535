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
//! both the check and the sequence accounting, into a list reused across calls; the
//! accounting also walks the samples by their lengths, to count and warn about a datagram
//! that was cut before it got here (relayed as it is).
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

use crate::config::{Config, ReceiveOn};
use crate::metrics::Metrics;

/// Payload bytes are copied into arenas of this size, so each datagram holds a small share of
/// an allocation instead of a whole receive buffer.
const ARENA_LEN: usize = 256 * 1024;

/// The arena size of a receive task ([`ReceiveOn::Runtime`]): a process that hosts
/// thousands of low-rate agents keeps each one's share small.
const TASK_ARENA_LEN: usize = 16 * 1024;

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

impl Receiver {
    /// A receive loop's state for the socket at `local`, copying into arenas of `arena_len`.
    fn check(&self, local: Option<SocketAddr>, arena_len: usize) -> Check {
        Check {
            admission: self.admission.clone(),
            local,
            arena: BytesMut::new(),
            arena_len,
            headers: Vec::with_capacity(udp::RECV_BATCH),
            refusals: RateLimit::new(Duration::from_secs(10)),
            full: RateLimit::new(Duration::from_secs(10)),
        }
    }
}

/// The receive loops, one per socket.
pub(crate) struct Receiving {
    /// The threads; each ends within [`CANCEL_CHECK`] of the token's cancellation.
    pub(crate) threads: Vec<std::thread::JoinHandle<()>>,
    /// Or the tasks, with [`ReceiveOn::Runtime`]; each ends at the token's cancellation.
    pub(crate) tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Each socket's address and its kernel-drop counter, for the observability endpoint.
    pub(crate) listening: Vec<(SocketAddr, prometheus::IntCounter)>,
}

/// Starts a receive loop on each socket (a thread, or a task with [`ReceiveOn::Runtime`]),
/// each handing its datagrams to `batcher`, until
/// `token` is cancelled. Logs each address.
///
/// # Errors
///
/// When a socket's address cannot be read or a thread cannot be started.
pub(crate) fn spawn_all(
    sockets: Vec<UdpSocket>,
    batcher: &mpsc::Sender<Chunk>,
    config: &Config,
    metrics: &Arc<Metrics>,
    token: &CancellationToken,
) -> std::io::Result<Receiving> {
    let mut receiving = Receiving {
        threads: Vec::new(),
        tasks: Vec::new(),
        listening: Vec::with_capacity(sockets.len()),
    };
    for socket in sockets {
        let listen = socket.local_addr()?;
        tracing::info!(
            %listen,
            accept = config.admission.accept().as_str(),
            allow_sources = %config.admission.allow_display(),
            "receiving sFlow"
        );
        let kernel_drops = metrics
            .kernel_drops
            .with_label_values(&[&listen.to_string()]);
        receiving.listening.push((listen, kernel_drops));
        let receiver = Receiver {
            batcher: batcher.clone(),
            metrics: metrics.clone(),
            admission: config.admission.clone(),
            coalesce: config.recv_coalesce,
        };
        let token = token.clone();
        match config.receive_on {
            ReceiveOn::Threads => {
                let thread = std::thread::Builder::new()
                    .name("relay-recv".into())
                    .spawn(move || receive_loop(socket, receiver, token))?;
                receiving.threads.push(thread);
            }
            ReceiveOn::Runtime => {
                socket.set_nonblocking(true)?;
                let socket = tokio::net::UdpSocket::from_std(socket)?;
                receiving
                    .tasks
                    .push(tokio::spawn(receive_task(socket, receiver, token)));
            }
        }
    }
    Ok(receiving)
}

/// Receives until `token` is cancelled, sending the datagrams `admission` admits to `batcher`
/// in chunks, pausing `coalesce` each time the socket is empty. Blocks: run it on a thread of
/// its own.
pub(crate) fn receive_loop(socket: UdpSocket, receiver: Receiver, token: CancellationToken) {
    let local = socket.local_addr().ok();
    if let Err(error) = socket
        .set_nonblocking(false)
        .and_then(|()| socket.set_read_timeout(Some(CANCEL_CHECK)))
    {
        tracing::error!(?local, %error, "cannot set up the socket; receiving stops");
        return;
    }
    let mut slots = udp::RecvBatch::default();
    let mut check = receiver.check(local, ARENA_LEN);
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
        check.hand_off(&slots, n, &receiver);
        let drained = n < udp::RECV_BATCH;
        if drained && !receiver.coalesce.is_zero() {
            std::thread::sleep(receiver.coalesce);
        }
    }
}

/// [`receive_loop`] as a task on the runtime ([`ReceiveOn::Runtime`]): the same checks,
/// hand-off and pause, woken by the runtime when the socket is readable; ends at the token's
/// cancellation.
async fn receive_task(socket: tokio::net::UdpSocket, receiver: Receiver, token: CancellationToken) {
    let mut slots = udp::RecvBatch::default();
    let mut check = receiver.check(socket.local_addr().ok(), TASK_ARENA_LEN);
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            ready = socket.readable() => {
                if let Err(error) = ready {
                    tracing::error!(local = ?check.local, %error, "socket failed; receiving stops");
                    return;
                }
            }
        }
        let n = match socket.try_io(tokio::io::Interest::READABLE, || slots.recv(&socket, false)) {
            Ok(n) => n,
            Err(error) => {
                if !matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) {
                    tracing::debug!(local = ?check.local, %error, "receive error");
                }
                continue;
            }
        };
        check.hand_off(&slots, n, &receiver);
        if n < udp::RECV_BATCH && !receiver.coalesce.is_zero() {
            tokio::time::sleep(receiver.coalesce).await;
        }
    }
}

/// What a receive loop keeps from one call to the next to check what it received and copy
/// out what it relays.
struct Check {
    /// What is relayed.
    admission: Admission,
    /// The socket's address, for the log.
    local: Option<SocketAddr>,
    /// Where payloads are copied to.
    arena: BytesMut,
    /// The size of each new arena.
    arena_len: usize,
    /// The sFlow headers of one call, each with its datagram's slot, for the sequence
    /// accounting (reused).
    headers: Vec<(Result<Header, NotSflow>, usize)>,
    /// Logging of refused datagrams: one warning per interval.
    refusals: RateLimit,
    /// Logging of datagrams dropped on a full batch queue: one warning per interval.
    full: RateLimit,
}

impl Check {
    /// Checks the `n` datagrams in `slots` and hands what is relayed to the batcher without
    /// waiting; when its queue is full they are dropped, counted and logged.
    fn hand_off(&mut self, slots: &udp::RecvBatch, n: usize, to: &Receiver) {
        let chunk = self.admit(slots, n, &to.metrics);
        let relayed = chunk.len();
        if relayed > 0 && to.batcher.try_send(chunk).is_err() {
            to.metrics.dropped_queue_full.inc_by(relayed as u64);
            if let Some(more) = self.full.check() {
                tracing::warn!(
                    local = ?self.local,
                    dropped_datagrams = relayed,
                    earlier_drops_not_logged = more,
                    "batch queue full: datagrams dropped"
                );
            }
        }
    }

    /// Checks the `n` datagrams one receive call put in `slots` and returns those admitted,
    /// copied out; counts them all (received, bytes, refused by reason, sequence gaps).
    fn admit(&mut self, slots: &udp::RecvBatch, n: usize, metrics: &Metrics) -> Chunk {
        const UNSPECIFIED: SocketAddr =
            SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
        let received_unix_nanos = unix_nanos();
        let mut bytes = 0;
        let mut not_allowed = 0;
        // Allocated at the first datagram relayed: a flood of refused ones allocates nothing.
        let mut chunk = Vec::new();
        self.headers.clear();
        for i in 0..n {
            let data = slots.datagram(i);
            bytes += data.len();
            let source = slots.source(i).unwrap_or(UNSPECIFIED);
            let verdict = self.admission.check(source, data);
            match verdict {
                Verdict::Relay(header) => {
                    self.headers.push((header, i));
                    if chunk.capacity() == 0 {
                        chunk.reserve_exact(n - i);
                    }
                    chunk.push(
                        proto::wire::Datagram {
                            payload: copy_out(&mut self.arena, self.arena_len, data),
                            source,
                            received_unix_nanos,
                        }
                        .to_proto(),
                    );
                    continue;
                }
                Verdict::NotSflow(reason) => self.headers.push((Err(reason), i)),
                Verdict::SourceNotAllowed => not_allowed += 1,
            }
            self.log_refusal(verdict, source, data.len());
        }
        // What was refused, and why, is counted before what was received: a scrape that sees
        // the received count include a datagram also sees its refusal counted.
        if not_allowed > 0 {
            metrics.source_not_allowed.inc_by(not_allowed);
        }
        metrics.sflow.observe_parsed(
            self.headers
                .drain(..)
                .map(|(header, i)| (header, slots.datagram(i))),
        );
        metrics.datagrams_received.inc_by(n as u64);
        metrics.bytes_received.inc_by(bytes as u64);
        chunk
    }

    /// Logs a refused datagram, at most once per interval.
    fn log_refusal(&self, verdict: Verdict, source: SocketAddr, len: usize) {
        let Some(more) = self.refusals.check() else {
            return;
        };
        let local = self.local;
        let reason = verdict.reason().unwrap_or_default();
        if verdict == Verdict::SourceNotAllowed {
            tracing::warn!(?local, %source, len, reason, earlier_drops_not_logged = more, "datagram dropped: its source is not in --allow-sources");
        } else {
            tracing::warn!(?local, %source, len, reason, earlier_drops_not_logged = more, "datagram dropped: not sflow v5 (--accept any relays any udp)");
        }
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn copy_out(arena: &mut BytesMut, arena_len: usize, data: &[u8]) -> Bytes {
    if arena.capacity() - arena.len() < data.len() {
        *arena = BytesMut::with_capacity(arena_len.max(data.len()));
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
        let a = copy_out(&mut arena, ARENA_LEN, b"first");
        let big = vec![7u8; 65_507];
        let b = copy_out(&mut arena, ARENA_LEN, &big);
        let c = copy_out(&mut arena, ARENA_LEN, b"third");
        assert_eq!(&a[..], b"first");
        assert_eq!(&b[..], &big[..]);
        assert_eq!(&c[..], b"third");
        let mut many = Vec::new();
        for i in 0..1000u32 {
            many.push((
                i,
                copy_out(&mut arena, ARENA_LEN, &i.to_be_bytes().repeat(350)),
            ));
        }
        for (i, bytes) in many {
            assert_eq!(&bytes[..], &i.to_be_bytes().repeat(350)[..]);
        }
    }

    /// Both kinds of receive loop hand over what arrives, in order, and end when the token is
    /// cancelled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn threads_and_tasks_receive_alike_and_stop_on_cancellation() {
        for receive_on in [ReceiveOn::Threads, ReceiveOn::Runtime] {
            let mut config = Config::try_from(crate::config::Args {
                sink: Some(crate::config::Sinks::One("127.0.0.1:9".into())),
                ca: Some("ca.pem".into()),
                cert: Some("agent.pem".into()),
                key: Some("agent.key".into()),
                ..Default::default()
            })
            .expect("config");
            config.admission = Admission::new(runtime::admission::Accept::Any, Vec::new());
            config.receive_on = receive_on;
            let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
            let to = socket.local_addr().expect("address");
            let (tx, mut rx) = mpsc::channel(64);
            let token = CancellationToken::new();
            let metrics = Arc::new(Metrics::default());
            let receiving =
                spawn_all(vec![socket], &tx, &config, &metrics, &token).expect("receive");
            assert_eq!(
                receiving.threads.len(),
                usize::from(receive_on == ReceiveOn::Threads)
            );
            assert_eq!(
                receiving.tasks.len(),
                usize::from(receive_on == ReceiveOn::Runtime)
            );
            drop(tx);
            let sender = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
            for i in 0..50u32 {
                sender.send_to(&i.to_be_bytes(), to).expect("send");
            }
            let mut got = Vec::new();
            while got.len() < 50 {
                let chunk = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                    .await
                    .expect("datagrams within 5 s")
                    .expect("receiving goes on");
                got.extend(chunk.into_iter().map(|d| d.payload));
            }
            let expected: Vec<Bytes> = (0..50u32)
                .map(|i| Bytes::copy_from_slice(&i.to_be_bytes()))
                .collect();
            assert_eq!(got, expected, "{receive_on:?}");
            token.cancel();
            for thread in receiving.threads {
                tokio::task::spawn_blocking(move || thread.join())
                    .await
                    .expect("join")
                    .expect("thread");
            }
            for task in receiving.tasks {
                tokio::time::timeout(Duration::from_secs(1), task)
                    .await
                    .expect("the task ends at cancellation")
                    .expect("task");
            }
            // Both loops held the last senders: the queue is closed now.
            assert!(rx.recv().await.is_none(), "{receive_on:?}");
        }
    }
}

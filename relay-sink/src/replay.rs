//! Replaying datagrams as UDP, byte for byte, to every destination.
//!
//! Each destination has its own task, socket and bounded queue. A destination whose port is
//! closed or unreachable fails fast (errors counted) and holds back no one. A slow one (paced,
//! or a full socket) fills its queue; a batch then waits for room for up to [`SUBMIT_WAIT`],
//! which slows the agents down through their windows (acknowledgements wait for every
//! destination), and after that is dropped for that destination alone, counted. Within a
//! destination, datagrams leave in the order batches were submitted, and a connection submits
//! its batches in the agent's order.
//!
//! Each destination socket is *connected*, so the kernel reports ICMP port-unreachable back as
//! an error on the next send, which is counted and logged (rate-limited). Datagrams leave from
//! the sink's own address: sFlow collectors identify agents by the address inside the datagram.
//!
//! **Hard caps.** With `--replay-max-pps` or `--replay-max-bps` set (both off by default), each
//! destination sends at most that many datagrams and bytes a second, live traffic included (a
//! token bucket with a small burst). Catch-up traffic is paced before it gets here, on each
//! agent's connection ([`crate::catch_up`]), so one agent's backlog does not queue in front
//! of another agent's live traffic.
//!
//! **Completion.** [`Replay::submit`] returns a [`Replaying`] that completes once every
//! destination has sent the batch (or dropped it, counted): the ingress acknowledges a batch
//! to its agent only then, so an acknowledged batch has left the sink.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proto::pb;
use runtime::ratelimit::RateLimit;
use runtime::udp::{self, Buffers};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::metrics::{DestinationMetrics, Metrics};

/// How long a batch waits for room in a destination's queue before that destination drops
/// it: far longer than a paced destination needs to make room, far shorter than an agent's
/// patience.
pub const SUBMIT_WAIT: Duration = Duration::from_secs(5);

/// The replay side: hand it batches; it fans them out.
#[derive(Debug)]
pub struct Replay {
    destinations: Vec<Destination>,
}

#[derive(Debug)]
struct Destination {
    addr: SocketAddr,
    queue: mpsc::Sender<Arc<Replaying>>,
    metrics: DestinationMetrics,
    full: RateLimit,
    behind: RateLimit,
}

/// Hard caps per destination; 0 means no limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pace {
    /// Datagrams a second.
    pub max_pps: u64,
    /// Bytes (UDP payload) a second.
    pub max_bps: u64,
}

/// A batch being replayed; complete when every destination is done with it.
#[derive(Debug)]
pub struct Replaying {
    /// The batch.
    pub batch: pb::Batch,
    remaining: AtomicUsize,
    done: Notify,
}

impl Replaying {
    fn finish_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_waiters();
        }
    }

    /// Waits until every destination has sent (or dropped) the batch.
    pub async fn finished(&self) {
        let notified = self.done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.remaining.load(Ordering::Acquire) == 0 {
            return;
        }
        notified.await;
    }
}

impl Replay {
    /// Resolves and connects one socket per destination and starts their tasks in `tasks`.
    /// Dropping the `Replay` lets the tasks finish what is queued and end.
    ///
    /// # Errors
    ///
    /// When a destination does not resolve, or its socket cannot be made.
    pub async fn start(
        forward: &[String],
        queue: usize,
        send_buffer: usize,
        pace: Pace,
        metrics: Arc<Metrics>,
        tasks: &mut JoinSet<()>,
    ) -> Result<Self, crate::Error> {
        let mut destinations = Vec::with_capacity(forward.len());
        for target in forward {
            let addr = tokio::net::lookup_host(target.as_str())
                .await
                .ok()
                .and_then(|mut addrs| addrs.next())
                .ok_or_else(|| {
                    crate::Error::Destination(target.clone(), "does not resolve".into())
                })?;
            let local: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().expect("valid")
            } else {
                "[::]:0".parse().expect("valid")
            };
            let socket = udp::bind(
                local,
                Buffers {
                    recv: None,
                    send: Some(send_buffer),
                },
            )
            .and_then(UdpSocket::from_std)
            .map_err(|e| crate::Error::Destination(target.clone(), e.to_string()))?;
            socket
                .connect(addr)
                .await
                .map_err(|e| crate::Error::Destination(target.clone(), e.to_string()))?;
            let (tx, rx) = mpsc::channel(queue);
            let dest_metrics = metrics.for_destination(target);
            tasks.spawn(send_loop(addr, socket, rx, pace, dest_metrics.clone()));
            tracing::info!(
                destination = %addr,
                max_pps = pace.max_pps,
                max_bytes_per_second = pace.max_bps,
                "replaying to destination"
            );
            destinations.push(Destination {
                addr,
                queue: tx,
                metrics: dest_metrics,
                full: RateLimit::new(Duration::from_secs(10)),
                behind: RateLimit::new(Duration::from_secs(60)),
            });
        }
        Ok(Self { destinations })
    }

    /// Queues `batch` for every destination. A full queue is waited on (the agents' windows
    /// make that the backpressure that slows them down), for at most [`SUBMIT_WAIT`]; a
    /// destination whose queue stays full that long drops the batch (counted, logged).
    pub async fn submit(&self, batch: pb::Batch) -> Arc<Replaying> {
        let replaying = Arc::new(Replaying {
            batch,
            remaining: AtomicUsize::new(self.destinations.len()),
            done: Notify::new(),
        });
        for dest in &self.destinations {
            if dest.queue.capacity() < dest.queue.max_capacity() / 2
                && let Some(more) = dest.behind.check()
            {
                tracing::warn!(
                    destination = %dest.addr,
                    queued_batches = dest.queue.max_capacity() - dest.queue.capacity(),
                    earlier_warnings_not_logged = more,
                    "replay to this destination is falling behind (a slow socket, or the --replay-max-pps / --replay-max-bps cap): agents are slowed down, and drop what their backlogs cannot hold"
                );
            }
            let queued = match dest.queue.try_send(replaying.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
                Err(mpsc::error::TrySendError::Full(batch)) => matches!(
                    tokio::time::timeout(SUBMIT_WAIT, dest.queue.send(batch)).await,
                    Ok(Ok(()))
                ),
            };
            if !queued {
                replaying.finish_one();
                let n = replaying.batch.datagrams.len() as u64;
                dest.metrics.queue_drops.inc_by(n);
                if let Some(more) = dest.full.check() {
                    tracing::warn!(
                        destination = %dest.addr,
                        dropped_datagrams = n,
                        earlier_drops_not_logged = more,
                        "replay queue full for too long: destination cannot keep up, datagrams dropped"
                    );
                }
            }
        }
        replaying
    }
}

/// A token bucket of datagrams and bytes, refilled continuously.
#[derive(Debug)]
struct Bucket {
    pace: Pace,
    datagrams: f64,
    bytes: f64,
    burst_datagrams: f64,
    burst_bytes: f64,
    at: Instant,
}

impl Bucket {
    fn new(pace: Pace) -> Self {
        // Room for a few milliseconds of the pace (the timer's granularity), no more: a
        // collector's default socket buffer holds about 90 datagrams of 1,400 bytes.
        let burst_datagrams = (pace.max_pps as f64 / 250.0).max(16.0);
        let burst_bytes = (pace.max_bps as f64 / 250.0).max(2.0 * 65_535.0);
        Self {
            pace,
            datagrams: burst_datagrams,
            bytes: burst_bytes,
            burst_datagrams,
            burst_bytes,
            at: Instant::now(),
        }
    }

    /// Waits until the first of `datagrams` may go, then takes the tokens of as many as fit
    /// now, and returns how many (at least one).
    async fn take_many(&mut self, datagrams: &[&[u8]]) -> usize {
        self.take(datagrams[0].len()).await;
        let mut n = 1;
        while let Some(next) = datagrams.get(n) {
            let len = next.len() as f64;
            let fits = (self.pace.max_pps == 0 || self.datagrams >= 1.0)
                && (self.pace.max_bps == 0 || self.bytes >= len);
            if !fits {
                break;
            }
            self.datagrams -= 1.0;
            self.bytes -= len;
            n += 1;
        }
        n
    }

    /// Waits until one datagram of `len` bytes may go, and takes its tokens.
    async fn take(&mut self, len: usize) {
        loop {
            let now = Instant::now();
            let elapsed = now.duration_since(self.at).as_secs_f64();
            self.at = now;
            self.datagrams =
                (self.datagrams + elapsed * self.pace.max_pps as f64).min(self.burst_datagrams);
            self.bytes = (self.bytes + elapsed * self.pace.max_bps as f64).min(self.burst_bytes);
            let need_datagrams = if self.pace.max_pps == 0 {
                0.0
            } else {
                (1.0 - self.datagrams) / self.pace.max_pps as f64
            };
            let need_bytes = if self.pace.max_bps == 0 {
                0.0
            } else {
                (len as f64 - self.bytes) / self.pace.max_bps as f64
            };
            let wait = need_datagrams.max(need_bytes);
            if wait <= 0.0 {
                self.datagrams -= 1.0;
                self.bytes -= len as f64;
                return;
            }
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

async fn send_loop(
    addr: SocketAddr,
    socket: UdpSocket,
    mut queue: mpsc::Receiver<Arc<Replaying>>,
    pace: Pace,
    metrics: DestinationMetrics,
) {
    let errors = RateLimit::new(Duration::from_secs(10));
    let mut bucket = (pace.max_pps > 0 || pace.max_bps > 0).then(|| Bucket::new(pace));
    let mut out = udp::SendBatch::new(udp::SEND_BATCH);
    while let Some(replaying) = queue.recv().await {
        let datagrams: Vec<&[u8]> = replaying
            .batch
            .datagrams
            .iter()
            .map(|d| &d.payload[..])
            .collect();
        let mut next = 0;
        while next < datagrams.len() {
            // As many as the pace allows now (all of them when unpaced), in one system call
            // per `udp::SEND_BATCH`.
            let allowed = match &mut bucket {
                Some(bucket) => bucket.take_many(&datagrams[next..]).await,
                None => datagrams.len() - next,
            };
            let group = &datagrams[next..next + allowed];
            next += allowed;
            let mut done = 0;
            while done < group.len() {
                let rest = &group[done..];
                match socket.try_io(Interest::WRITABLE, || out.send(&socket, rest)) {
                    Ok(n) => {
                        metrics.replayed.inc_by(n as u64);
                        metrics
                            .bytes
                            .inc_by(rest[..n].iter().map(|d| d.len() as u64).sum());
                        done += n;
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        // The socket buffer is full: wait for room, lose nothing.
                        if let Err(error) = socket.writable().await {
                            tracing::warn!(destination = %addr, %error, "replay socket failed");
                            return;
                        }
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(error) => {
                        // This datagram was refused (port unreachable reported back, too
                        // large): count it, skip it, send the rest.
                        metrics.errors.inc();
                        if let Some(more) = errors.check() {
                            tracing::warn!(
                                destination = %addr,
                                %error,
                                len = rest[0].len(),
                                earlier_errors_not_logged = more,
                                "replay to destination failed; datagram dropped"
                            );
                        }
                        done += 1;
                    }
                }
            }
        }
        replaying.finish_one();
    }
    tracing::debug!(destination = %addr, "replay task finished");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paced_groups_hold_the_burst_then_the_rate() {
        let pace = Pace {
            max_pps: 1_000,
            max_bps: 0,
        };
        let mut bucket = Bucket::new(pace);
        let payload = [0u8; 1_400];
        let datagrams: Vec<&[u8]> = vec![&payload[..]; 100];
        let start = Instant::now();
        // The burst (16 datagrams) goes at once, in one group.
        assert_eq!(bucket.take_many(&datagrams).await, 16);
        assert_eq!(start.elapsed(), Duration::ZERO);
        // Then the pace: 84 more at 1,000 a second take about 84 ms.
        let mut sent = 16;
        while sent < datagrams.len() {
            sent += bucket.take_many(&datagrams[sent..]).await;
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(83) && took <= Duration::from_millis(90),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_byte_pace_limits_groups_by_size() {
        let pace = Pace {
            max_pps: 0,
            max_bps: 1_000_000,
        };
        let mut bucket = Bucket::new(pace);
        // The byte burst is two maximum datagrams (131,070 bytes): 93 of 1,400 bytes fit.
        let payload = [0u8; 1_400];
        let datagrams: Vec<&[u8]> = vec![&payload[..]; 200];
        assert_eq!(bucket.take_many(&datagrams).await, 93);
    }
}

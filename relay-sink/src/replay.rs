//! Replaying datagrams as UDP, byte for byte, to every destination.
//!
//! Each destination has its own task, socket and bounded queue, so a destination that is slow
//! or failing holds back neither the others nor the agents' connections: when its queue is
//! full, its datagrams are dropped and counted. Within a destination, datagrams leave in the
//! order batches were submitted, and a connection submits its batches in the agent's order.
//!
//! Each destination socket is *connected*, so the kernel reports ICMP port-unreachable back as
//! an error on the next send, which is counted and logged (rate-limited). Datagrams leave from
//! the sink's own address: sFlow collectors identify agents by the address inside the datagram.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::pb;
use runtime::ratelimit::RateLimit;
use runtime::udp::{self, Buffers};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::metrics::Metrics;

/// The replay side: hand it batches; it fans them out.
#[derive(Debug)]
pub struct Replay {
    destinations: Vec<Destination>,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
struct Destination {
    addr: SocketAddr,
    queue: mpsc::Sender<Arc<pb::Batch>>,
    full: RateLimit,
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
            tasks.spawn(send_loop(addr, socket, rx, metrics.clone()));
            tracing::info!(destination = %addr, "replaying to destination");
            destinations.push(Destination {
                addr,
                queue: tx,
                full: RateLimit::new(Duration::from_secs(10)),
            });
        }
        Ok(Self {
            destinations,
            metrics,
        })
    }

    /// Queues `batch` for every destination; never waits.
    pub fn submit(&self, batch: Arc<pb::Batch>) {
        for dest in &self.destinations {
            if let Err(mpsc::error::TrySendError::Full(batch)) = dest.queue.try_send(batch.clone())
            {
                let n = batch.datagrams.len() as u64;
                Metrics::add(&self.metrics.replay_queue_drops, n);
                if let Some(more) = dest.full.check() {
                    tracing::warn!(
                        destination = %dest.addr,
                        dropped_datagrams = n,
                        earlier_drops_not_logged = more,
                        "replay queue full: destination cannot keep up, datagrams dropped"
                    );
                }
            }
        }
    }
}

async fn send_loop(
    addr: SocketAddr,
    socket: UdpSocket,
    mut queue: mpsc::Receiver<Arc<pb::Batch>>,
    metrics: Arc<Metrics>,
) {
    let errors = RateLimit::new(Duration::from_secs(10));
    while let Some(batch) = queue.recv().await {
        for datagram in &batch.datagrams {
            match socket.send(&datagram.payload).await {
                Ok(_) => Metrics::add(&metrics.datagrams_replayed, 1),
                Err(error) => {
                    Metrics::add(&metrics.replay_errors, 1);
                    if let Some(more) = errors.check() {
                        tracing::warn!(
                            destination = %addr,
                            %error,
                            len = datagram.payload.len(),
                            earlier_errors_not_logged = more,
                            "replay to destination failed; datagram dropped"
                        );
                    }
                }
            }
        }
    }
    tracing::debug!(destination = %addr, "replay task finished");
}

//! A link to one sink over QUIC: connect (mutual TLS), open one bidirectional stream, write
//! batch frames, read acknowledgements; on failure, reconnect with backoff.
//!
//! Delivery today: a frame taken from the queue while the connection is down waits for the
//! next connection. Frames written to a connection that breaks before the sink acknowledges
//! them are counted as lost (`dropped_connection_lost`) and never written twice: the sink
//! may have replayed them, and a duplicate would distort the analyzer's counters.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use proto::pb;
use proto::wire::FrameReader;
use quinn::{Connection, Endpoint, VarInt};
use tokio::sync::{mpsc, watch};

use super::Backoff;
use crate::batch::Frame;
use crate::config::SinkConfig;
use crate::metrics::{self, SinkMetrics};

/// A connection that lasts this long counts as accepted, even with nothing to send.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Acks are tiny; anything larger is a broken peer.
const MAX_ACK_FRAME: usize = 1024;

/// Everything a link needs.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) sink: SinkConfig,
    pub(crate) client: quinn::ClientConfig,
    pub(crate) endpoint: Endpoint,
    pub(crate) queue: mpsc::Receiver<Frame>,
    pub(crate) metrics: Arc<SinkMetrics>,
    pub(crate) connect_timeout: Duration,
    pub(crate) backoff: Backoff,
    /// (sequence, datagrams) of batches written and not yet acknowledged.
    pub(crate) in_flight: VecDeque<(u64, u64)>,
}

impl Link {
    /// Runs until the queue is closed and drained, everything sent is acknowledged (or the
    /// connection is lost during that wait), and the connection is closed.
    pub(crate) async fn run(mut self) {
        let mut carry: Option<Frame> = None;
        loop {
            // While connecting, also watch the queue: a closed, empty queue means the agent is
            // shutting down with nothing for this sink, and a handshake that may never
            // complete (an unreachable sink) must not hold the shutdown up.
            let attempt = {
                let connecting = connect(
                    &self.endpoint,
                    &self.client,
                    &self.sink,
                    self.connect_timeout,
                );
                tokio::pin!(connecting);
                loop {
                    tokio::select! {
                        result = &mut connecting => break result,
                        frame = self.queue.recv(), if carry.is_none() => match frame {
                            Some(frame) => carry = Some(frame),
                            None => {
                                tracing::info!(sink = %self.sink.addr, "shutting down: nothing left to send to this sink");
                                return;
                            }
                        },
                    }
                }
            };
            let connection = match attempt {
                Ok(connection) => connection,
                Err(reason) => {
                    metrics::add(&self.metrics.connect_failures, 1);
                    let wait = self.backoff.next_delay();
                    tracing::warn!(sink = %self.sink.addr, %reason, retry_in = ?wait, "cannot connect to sink");
                    if !self.pause(wait, &mut carry).await {
                        return;
                    }
                    continue;
                }
            };
            metrics::add(&self.metrics.connects, 1);
            tracing::info!(sink = %self.sink.addr, remote = %connection.remote_address(), "connected to sink");
            let result = self.stream(&connection, &mut carry).await;
            // Batches written but not acknowledged may or may not have been replayed; without
            // resending (planned) they count as lost. Acks that arrived after the last write
            // are taken into account first.
            let acked = metrics::get(&self.metrics.acked_sequence);
            self.in_flight.retain(|&(sequence, _)| sequence > acked);
            let unacknowledged: u64 = self
                .in_flight
                .drain(..)
                .map(|(_, datagrams)| datagrams)
                .sum();
            metrics::add(&self.metrics.dropped_connection_lost, unacknowledged);
            match result {
                Ok(()) => return,
                Err(reason) => {
                    let wait = self.backoff.next_delay();
                    tracing::warn!(
                        sink = %self.sink.addr,
                        %reason,
                        unacknowledged_datagrams = unacknowledged,
                        retry_in = ?wait,
                        "connection to sink lost; reconnecting"
                    );
                    if !self.pause(wait, &mut carry).await {
                        return;
                    }
                }
            }
        }
    }

    /// Waits `wait` before the next attempt, taking a frame from the queue meanwhile (so a
    /// closed queue is noticed). Returns false when the queue has closed with nothing left to
    /// send: the agent is shutting down and there is no reason to retry.
    async fn pause(&mut self, wait: Duration, carry: &mut Option<Frame>) -> bool {
        let until = tokio::time::Instant::now() + wait;
        if carry.is_none() {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                frame = self.queue.recv() => match frame {
                    Some(frame) => *carry = Some(frame),
                    None => {
                        tracing::info!(sink = %self.sink.addr, "sink unreachable and nothing left to send");
                        return false;
                    }
                },
            }
        }
        tokio::time::sleep_until(until).await;
        true
    }

    /// Streams frames on one connection. `Ok` when the queue closed and the end was handled;
    /// `Err` with a reason when the connection broke.
    async fn stream(
        &mut self,
        connection: &Connection,
        carry: &mut Option<Frame>,
    ) -> Result<(), String> {
        let (mut send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        let (acked_tx, mut acked) = watch::channel(0u64);
        let ack_metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut reader = FrameReader::new(recv, MAX_ACK_FRAME);
            while let Ok(Some(ack)) = reader.next::<pb::Ack>().await {
                ack_metrics
                    .acked_sequence
                    .fetch_max(ack.sequence, std::sync::atomic::Ordering::Relaxed);
                acked_tx.send_replace(ack.sequence);
            }
        });
        let mut last_sent = 0u64;
        // In TLS 1.3 the sink checks our certificate after our side of the handshake is done,
        // so "connected" is not yet "accepted". The backoff resets only once the sink has
        // acknowledged something or the connection has stayed up a while; a refused agent
        // keeps backing off instead of hammering the sink.
        let mut proven = false;
        let healthy_after = tokio::time::Instant::now() + HEALTHY_AFTER;
        loop {
            if !proven && (*acked.borrow() > 0 || tokio::time::Instant::now() >= healthy_after) {
                proven = true;
                self.backoff.reset();
            }
            let frame = match carry.take() {
                Some(frame) => Some(frame),
                None => tokio::select! {
                    frame = self.queue.recv() => frame,
                    error = connection.closed() => return Err(explain(&self.sink, &error.to_string())),
                    () = tokio::time::sleep_until(healthy_after), if !proven => continue,
                },
            };
            let Some(frame) = frame else { break };
            if let Some(error) = connection.close_reason() {
                *carry = Some(frame);
                return Err(error.to_string());
            }
            if let Err(error) = send.write_chunk(frame.bytes.clone()).await {
                metrics::add(&self.metrics.dropped_connection_lost, frame.datagrams);
                return Err(error.to_string());
            }
            last_sent = frame.sequence;
            self.in_flight.push_back((frame.sequence, frame.datagrams));
            let acked_now = *acked.borrow();
            while self
                .in_flight
                .front()
                .is_some_and(|&(sequence, _)| sequence <= acked_now)
            {
                self.in_flight.pop_front();
            }
            metrics::add(&self.metrics.batches_sent, 1);
            metrics::add(&self.metrics.datagrams_sent, frame.datagrams);
        }
        // The queue is closed: the agent is shutting down. Finish the stream and wait for the
        // sink to acknowledge the last batch (the caller bounds this wait).
        let _ = send.finish();
        let wait = acked.wait_for(|&seq| seq >= last_sent);
        tokio::select! {
            result = wait => {
                if result.is_ok() {
                    self.in_flight.clear();
                    tracing::info!(sink = %self.sink.addr, last_sequence = last_sent, "all batches acknowledged");
                }
            }
            error = connection.closed() => tracing::warn!(sink = %self.sink.addr, %error, "connection closed before all batches were acknowledged"),
        }
        connection.close(VarInt::from_u32(0), b"agent shutting down");
        Ok(())
    }
}

async fn connect(
    endpoint: &Endpoint,
    client: &quinn::ClientConfig,
    sink: &SinkConfig,
    timeout: Duration,
) -> Result<Connection, String> {
    let addr = tokio::net::lookup_host(sink.addr.as_str())
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", sink.addr))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", sink.addr))?;
    let connecting = endpoint
        .connect_with(client.clone(), addr, &sink.server_name)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(explain(sink, &error.to_string())),
        Err(_) => Err(format!(
            "no QUIC handshake with {addr} within {:?}",
            timeout
        )),
    }
}

/// Turns the usual TLS refusals into advice.
fn explain(sink: &SinkConfig, error: &str) -> String {
    if error.contains("NotValidForName") || error.contains("not valid for name") {
        format!(
            "the sink's certificate is not valid for the name {:?}: set --server-name to a name in its certificate ({error})",
            sink.server_name
        )
    } else if error.contains("UnknownIssuer") {
        format!(
            "the sink's certificate is not signed by the CA in {} ({error})",
            sink.ca.display()
        )
    } else if error.contains("certificate") {
        format!("the sink refused this agent's certificate or the handshake failed: {error}")
    } else {
        error.to_owned()
    }
}

//! What the sink tells about itself on `--metrics-listen`: which agents are connected
//! (`/agents`, JSON), where it replays (`/destinations`, JSON: each destination's filter and
//! end), whether it is ready (not once every destination has ended), and the values brought
//! up to date at each scrape (certificate expiry). The counters themselves live in
//! [`crate::metrics`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::Registry;
use serde_json::json;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::authz::Policy;
use crate::labels::{RefusalKind, Transport};
use crate::metrics::{AgentMetrics, Metrics};
use crate::replay::DestinationState;

/// The agent connections open now, and what each has sent.
#[derive(Debug)]
pub(crate) struct Agents {
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Arc<Connection>>>,
    handles: Mutex<HashMap<Arc<str>, AgentMetrics>>,
}

/// One agent connection.
#[derive(Debug)]
pub(crate) struct Connection {
    /// The name in the agent's certificate.
    pub(crate) agent: Arc<str>,
    remote: SocketAddr,
    transport: Transport,
    since: SystemTime,
    /// When the agent's certificate expires, Unix seconds.
    certificate_not_after: Option<i64>,
    /// The agent's certificate, for checking it again when the CRL or allow-list changes.
    certificate: Option<certs::CertInfo>,
    /// Cancelled to close the connection (its agent was revoked or taken off the list).
    closing: CancellationToken,
    /// Why it was closed, once it is.
    closed_for: OnceLock<RefusalKind>,
    datagrams: AtomicU64,
    bytes: AtomicU64,
    last_seen_ms: AtomicU64,
    handles: AgentMetrics,
    /// This connection's share of the catch-up pace: its agent's live rate.
    pub(crate) catch_up: crate::catch_up::Allowance,
    /// Its place in the destinations' queues.
    pub(crate) lane: crate::replay::Lane,
}

impl Connection {
    /// Resolves when this connection is to be closed for its agent's authorization.
    pub(crate) fn closing(&self) -> WaitForCancellationFuture<'_> {
        self.closing.cancelled()
    }

    /// Whether it is to be closed, and why.
    pub(crate) fn closed_for(&self) -> Option<RefusalKind> {
        self.closed_for.get().copied()
    }

    /// The agent's address.
    pub(crate) fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// The transport it came in on.
    pub(crate) fn transport(&self) -> Transport {
        self.transport
    }

    /// Counts a batch received on this connection.
    pub(crate) fn received(&self, datagrams: u64, bytes: u64) {
        self.datagrams.fetch_add(datagrams, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.last_seen_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
        self.handles.datagrams.inc_by(datagrams);
        self.handles.bytes.inc_by(bytes);
    }

    /// Counts datagrams of this agent dropped over `--max-datagram-bytes` and over
    /// `--agent-max-pps`.
    pub(crate) fn dropped(&self, too_large: u64, rate_limited: u64) {
        self.handles.dropped_too_large.inc_by(too_large);
        self.handles.dropped_rate_limited.inc_by(rate_limited);
    }
}

/// An open connection's place in [`Agents`]; dropping it removes the connection.
#[derive(Debug)]
pub(crate) struct Registered {
    id: u64,
    connection: Arc<Connection>,
    agents: Arc<Agents>,
}

impl std::ops::Deref for Registered {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.connection
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.agents.lock().remove(&self.id);
        self.connection.handles.connections.dec();
        self.agents.metrics.agents_connected.dec();
    }
}

impl Agents {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            next_id: AtomicU64::new(1),
            live: Mutex::default(),
            handles: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Connection>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a connection that completed the handshake; `certificate` is what it
    /// presented. Refused ([`RefusalKind::TooManyConnections`]) when `agent` already has
    /// `limit` connections open (0: no limit); counted under the same lock that adds it.
    pub(crate) fn connect(
        self: &Arc<Self>,
        agent: Arc<str>,
        remote: SocketAddr,
        transport: Transport,
        certificate: Option<certs::CertInfo>,
        limit: usize,
    ) -> Result<Registered, RefusalKind> {
        let mut live = self.lock();
        if limit > 0 && live.values().filter(|c| c.agent == agent).count() >= limit {
            return Err(RefusalKind::TooManyConnections);
        }
        let handles = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(agent.clone())
            .or_insert_with(|| self.metrics.for_agent(&agent))
            .clone();
        handles.connections.inc();
        self.metrics.accepted(transport).inc();
        self.metrics.agents_connected.inc();
        let certificate_not_after = certificate
            .as_ref()
            .map(|info| info.not_after.unix_timestamp());
        let now = SystemTime::now();
        let connection = Arc::new(Connection {
            agent,
            remote,
            transport,
            since: now,
            certificate_not_after,
            certificate,
            closing: CancellationToken::new(),
            closed_for: OnceLock::new(),
            datagrams: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            last_seen_ms: AtomicU64::new(unix_ms(now)),
            handles,
            catch_up: crate::catch_up::Allowance::default(),
            lane: crate::replay::Lane::default(),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        live.insert(id, connection.clone());
        Ok(Registered {
            id,
            connection,
            agents: self.clone(),
        })
    }

    /// Marks for closing every open connection that `policy` no longer admits (each once),
    /// and returns them with the reason.
    pub(crate) fn close_unauthorized(
        &self,
        policy: &Policy,
    ) -> Vec<(Arc<Connection>, RefusalKind)> {
        let mut closed = Vec::new();
        for c in self.lock().values() {
            if let Err(kind) = policy.check(&c.agent, c.certificate.as_ref())
                && c.closed_for.set(kind).is_ok()
            {
                c.closing.cancel();
                closed.push((c.clone(), kind));
            }
        }
        closed
    }

    /// The `/agents` page: one object per open connection, oldest first.
    pub(crate) fn page(&self) -> serde_json::Value {
        let live = self.lock();
        let list: Vec<_> = live
            .values()
            .map(|c| {
                json!({
                    "agent": &*c.agent,
                    "remote": c.remote.to_string(),
                    "transport": c.transport.as_str(),
                    "connected_since": rfc3339(c.since),
                    "datagrams": c.datagrams.load(Ordering::Relaxed),
                    "bytes": c.bytes.load(Ordering::Relaxed),
                    "last_seen": rfc3339(UNIX_EPOCH + std::time::Duration::from_millis(c.last_seen_ms.load(Ordering::Relaxed))),
                    "certificate_expires": c.certificate_not_after.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok()).and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// Sets each connected agent's certificate expiry series (the soonest of its
    /// connections), and removes those of agents no longer connected.
    fn refresh(&self) {
        let now = unix_ms(SystemTime::now()) as f64 / 1000.0;
        let mut soonest: HashMap<Arc<str>, i64> = HashMap::new();
        for c in self.lock().values() {
            if let Some(t) = c.certificate_not_after {
                let e = soonest.entry(c.agent.clone()).or_insert(t);
                *e = (*e).min(t);
            }
        }
        let family = &self.metrics.agent_certificate_expiry;
        for agent in self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
        {
            match soonest.get(agent) {
                Some(&t) => family.with_label_values(&[agent]).set(t as f64 - now),
                None => {
                    let _ = family.remove_label_values(&[agent]);
                }
            }
        }
    }
}

/// The sink as its observability endpoint sees it.
#[derive(Debug)]
pub(crate) struct SinkStatus {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) agents: Arc<Agents>,
    /// Listening, and the destination sockets open; false again once shutting down.
    pub(crate) ready: AtomicBool,
    /// When the certificate in use expires, Unix seconds.
    pub(crate) certificate_not_after: AtomicI64,
    /// The replay destinations.
    pub(crate) destinations: Vec<Arc<DestinationState>>,
    /// The sFlow interface counters served at `/metrics/sflow` (`--sflow-metrics`).
    pub(crate) sflow_metrics: Option<Arc<crate::sflow_metrics::SflowMetrics>>,
}

impl SinkStatus {
    /// The `/destinations` page: one object per destination replayed to at start, in the
    /// configured order.
    fn destinations_page(&self) -> serde_json::Value {
        let now = SystemTime::now();
        let list: Vec<_> = self
            .destinations
            .iter()
            .map(|d| {
                let route = d.route();
                let end = route.not_after();
                json!({
                    "destination": &d.name,
                    "address": d.addr.to_string(),
                    "filter": route.describe(),
                    "not_after": end.map(|end| end.as_str()),
                    "seconds_left": route.remaining(now).map(|left| left.as_secs()),
                    "state": if d.ended() { "ended" } else { "replaying" },
                    "datagrams_replayed": d.metrics.replayed.get(),
                    "datagrams_filtered": d.metrics.filtered.get(),
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }
}

impl runtime::observe::Status for SinkStatus {
    fn registry(&self) -> &Registry {
        self.metrics.registry()
    }

    fn refresh(&self) {
        let now = unix_ms(SystemTime::now()) as f64 / 1000.0;
        self.metrics
            .certificate_expiry
            .set(self.certificate_not_after.load(Ordering::Relaxed) as f64 - now);
        self.agents.refresh();
    }

    fn ready(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::Relaxed) {
            Err("starting or shutting down".into())
        } else if self.destinations.iter().all(|d| d.ended()) {
            Err("every replay destination has ended (not-after): nothing is replayed".into())
        } else {
            Ok(())
        }
    }

    fn page(&self, path: &str) -> Option<serde_json::Value> {
        match path {
            "/agents" => Some(self.agents.page()),
            "/destinations" => Some(self.destinations_page()),
            _ => None,
        }
    }

    fn exposition(&self, path: &str) -> Option<String> {
        match path {
            "/metrics/sflow" => self.sflow_metrics.as_ref().map(|m| m.render()),
            _ => None,
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn rfc3339(t: SystemTime) -> Option<String> {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_over_its_connection_limit_is_refused_as_too_many_connections() {
        let agents = Arc::new(Agents::new(Arc::new(Metrics::default())));
        let remote: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let connect = |agent: &str| agents.connect(agent.into(), remote, Transport::Quic, None, 1);
        let first = connect("site-a").expect("the first connection");
        assert_eq!(
            connect("site-a").map(drop),
            Err(RefusalKind::TooManyConnections)
        );
        assert!(
            connect("site-b").is_ok(),
            "another identity has its own limit"
        );
        drop(first);
        assert!(
            connect("site-a").is_ok(),
            "a closed connection frees its place"
        );
    }
}

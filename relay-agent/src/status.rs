//! What the agent tells about itself on `--metrics-listen`: whether it is ready, and the values
//! brought up to date at each scrape (kernel receive drops, certificate expiry). The counters
//! themselves live in [`crate::metrics`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, Registry};

use crate::metrics::{InUse, Metrics, SinkMetrics};

/// One sink, as readiness sees it.
#[derive(Debug)]
pub(crate) struct SinkState {
    pub(crate) addr: String,
    pub(crate) metrics: Arc<SinkMetrics>,
    /// The spool's size limit, when there is a spool.
    pub(crate) spool_max_bytes: Option<u64>,
    /// When the certificate this link presents expires, Unix seconds (updated on reload).
    pub(crate) certificate_not_after: Arc<AtomicI64>,
    /// Whether the sink's feed has ended (`not-after`): then it is no longer waited for.
    pub(crate) ended: Arc<AtomicBool>,
}

/// The agent as its observability endpoint sees it.
#[derive(Debug)]
pub(crate) struct AgentStatus {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) sinks: Vec<SinkState>,
    /// Each listen socket's address and its kernel-drop counter.
    pub(crate) listen: Vec<(SocketAddr, IntCounter)>,
    /// Receiving; false again once shutting down.
    pub(crate) receiving: AtomicBool,
}

impl runtime::observe::Status for AgentStatus {
    fn registry(&self) -> &Registry {
        self.metrics.registry()
    }

    fn refresh(&self) {
        for (addr, drops) in &self.listen {
            if let Some(total) = runtime::udp::kernel_drops(*addr) {
                runtime::observe::catch_up(drops, total);
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        for sink in &self.sinks {
            let not_after = sink.certificate_not_after.load(Ordering::Relaxed);
            sink.metrics.certificate_expiry.set(not_after as f64 - now);
        }
    }

    /// Ready while receiving and, for every sink whose feed goes on, connected or spooling
    /// within the spool's limit: then nothing received is being lost.
    fn ready(&self) -> Result<(), String> {
        if !self.receiving.load(Ordering::Relaxed) {
            return Err("not receiving (starting or shutting down)".into());
        }
        let problems: Vec<String> = self
            .sinks
            .iter()
            .filter_map(|sink| {
                if sink.metrics.transport() != InUse::None || sink.ended.load(Ordering::Relaxed) {
                    return None;
                }
                match sink.spool_max_bytes {
                    None => Some(format!("sink {}: not connected, and no spool", sink.addr)),
                    Some(max) if sink.metrics.spool_bytes.get() as u64 >= max => Some(format!(
                        "sink {}: not connected, and its spool is full",
                        sink.addr
                    )),
                    Some(_) => None,
                }
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

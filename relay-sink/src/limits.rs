//! The per-datagram limits on what an agent's batch may carry: `--max-datagram-bytes` for
//! each datagram and `--agent-max-pps` for each agent identity (the name in its certificate,
//! all its connections together).
//!
//! Datagrams over a limit are taken out of the batch; the rest is replayed and the batch
//! acknowledged as usual (an agent that resent it would only be dropped again). What this does
//! not do: pace catch-up traffic ([`crate::catch_up`]) or cap what a destination receives
//! ([`crate::replay`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::pb;
use runtime::ratelimit::RateLimit;

use crate::config::Config;
use crate::labels::LOG_TARGET;

/// Each agent identity's `--agent-max-pps` budget, and the log of what the limits drop.
#[derive(Debug, Default)]
pub(crate) struct Paces {
    buckets: std::sync::Mutex<HashMap<Arc<str>, Bucket>>,
    log: DropLog,
}

/// What [`Paces::limit`] took out of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dropped {
    /// Datagrams over `--max-datagram-bytes`.
    pub(crate) too_large: u64,
    /// Datagrams over `--agent-max-pps`.
    pub(crate) rate_limited: u64,
}

/// A token bucket holding up to one second of `--agent-max-pps`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One WARN line per 10 s at most for the datagrams dropped by [`Paces`].
#[derive(Debug)]
struct DropLog(RateLimit);

impl Default for DropLog {
    fn default() -> Self {
        Self(RateLimit::new(Duration::from_secs(10)))
    }
}

// === impl Bucket ===

impl Bucket {
    /// Refills for the time since the last call (up to one second of `rate`), then takes up
    /// to `n` tokens; returns how many it took.
    fn take(&mut self, now: Instant, rate: f64, n: usize) -> usize {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.at = now;
        let allowed = (self.tokens.floor() as usize).min(n);
        self.tokens -= allowed as f64;
        allowed
    }
}

// === impl Paces ===

impl Paces {
    /// Takes out of `agent`'s batch the datagrams over a limit of `config`, logs the drop
    /// (rate-limited) and returns how many it took, for the caller to count.
    pub(crate) fn limit(
        &self,
        config: &Config,
        agent: &Arc<str>,
        batch: &mut pb::Batch,
    ) -> Dropped {
        let max_len = config.max_datagram_bytes;
        let before = batch.datagrams.len();
        batch.datagrams.retain(|d| d.payload.len() <= max_len);
        let too_large = before - batch.datagrams.len();
        let mut rate_limited = 0;
        if config.agent_max_pps > 0 && !batch.datagrams.is_empty() {
            let rate = config.agent_max_pps as f64;
            let now = Instant::now();
            let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            let bucket = buckets.entry(agent.clone()).or_insert(Bucket {
                tokens: rate,
                at: now,
            });
            let allowed = bucket.take(now, rate, batch.datagrams.len());
            rate_limited = batch.datagrams.len() - allowed;
            batch.datagrams.truncate(allowed);
        }
        let dropped = Dropped {
            too_large: too_large as u64,
            rate_limited: rate_limited as u64,
        };
        if too_large + rate_limited > 0
            && let Some(more) = self.log.0.check()
        {
            tracing::warn!(
                target: LOG_TARGET,
                %agent,
                too_large,
                rate_limited,
                max_datagram_bytes = max_len,
                agent_max_pps = config.agent_max_pps,
                earlier_drops_not_logged = more,
                "datagrams from this agent over a limit: dropped"
            );
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_bucket_holds_one_second_and_refills_at_the_rate() {
        let start = Instant::now();
        let mut bucket = Bucket {
            tokens: 100.0,
            at: start,
        };
        assert_eq!(bucket.take(start, 100.0, 60), 60);
        assert_eq!(
            bucket.take(start, 100.0, 60),
            40,
            "the rest of the second's budget"
        );
        assert_eq!(bucket.take(start, 100.0, 10), 0, "empty");
        let later = start + Duration::from_millis(250);
        assert_eq!(
            bucket.take(later, 100.0, 60),
            25,
            "a quarter second refills 25"
        );
        let much_later = later + Duration::from_secs(60);
        assert_eq!(
            bucket.take(much_later, 100.0, 1_000),
            100,
            "never more than a second"
        );
    }
}

//! Pacing what agents send to catch up, and nothing else.
//!
//! Live batches (sent once, as the agent made them) are replayed as soon as they arrive. A
//! batch the agent marks as catch-up (sent again after a reconnect, read back from its spool,
//! held back by an outage; see `Batch.timing` in the wire contract) waits here, on its
//! connection, before it is handed to replay, in slices no larger than the pace's burst, so
//! that a backlog drains into the collectors at a rate, and in bursts, their sockets can take:
//!
//! - a shared budget of `--catch-up-max-pps` datagrams a second, for all agents' catch-up
//!   together (every destination gets every datagram, so this is each destination's
//!   catch-up rate), spent in arrival order;
//! - plus, per connection, the agent's own live rate (which it states in each catch-up
//!   batch): while an agent catches up, its live datagrams travel behind its backlog, in
//!   order, so it may send that much more; its backlog still shrinks at the catch-up pace.
//!
//! The wait is on the agent's connection alone: one agent's draining backlog never holds
//! back another agent's live traffic. The agent's window fills meanwhile, which slows it
//! down to the pace: that is the backpressure, and it loses nothing.
//!
//! A batch from an agent older than the mark (`TIMING_UNSPECIFIED`) is paced with the
//! shared budget alone, as older sinks paced all traffic.
//!
//! The hard caps per destination (`--replay-max-pps`, `--replay-max-bps`) are not here:
//! they are [`crate::replay`]'s, and off by default.

use std::sync::Mutex;
use std::time::Duration;

use proto::pb;
use tokio::time::Instant;

/// The shared catch-up budget.
#[derive(Debug)]
pub(crate) struct CatchUp {
    /// Datagrams a second; 0: catch-up is not paced.
    max_pps: u64,
    budget: Mutex<Debt>,
}

/// A token bucket that may go into debt: a caller takes what it needs at once and waits
/// until the debt is paid off, so callers are served in the order they came, and a batch
/// larger than the burst still goes (after its wait).
#[derive(Debug)]
struct Debt {
    tokens: f64,
    burst: f64,
    at: Instant,
}

impl Debt {
    fn new(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            burst,
            at: now,
        }
    }

    /// Takes `n` tokens at `rate` a second; returns how long to wait before they are paid.
    fn take(&mut self, now: Instant, rate: f64, n: f64) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * rate).min(self.burst);
        self.tokens -= n;
        if self.tokens >= 0.0 || rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

/// The budget of one connection: its agent's live rate. Held by the connection.
#[derive(Debug, Default)]
pub(crate) struct Allowance(Mutex<Option<Own>>);

#[derive(Debug)]
struct Own {
    tokens: f64,
    at: Instant,
}

impl Allowance {
    /// Takes up to `n` datagrams from an allowance that refills at `rate` a second and holds
    /// at most 20 ms of it (at least [`MIN_BURST`]); returns how many it took.
    fn take(&self, now: Instant, rate: u32, n: u64) -> u64 {
        if rate == 0 {
            return 0;
        }
        let rate = f64::from(rate);
        let burst = (rate / 50.0).max(MIN_BURST);
        let mut own = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let own = own.get_or_insert(Own {
            tokens: 0.0,
            at: now,
        });
        let elapsed = now.saturating_duration_since(own.at).as_secs_f64();
        own.at = now;
        own.tokens = (own.tokens + elapsed * rate).min(burst);
        let took = (own.tokens.max(0.0).floor() as u64).min(n);
        own.tokens -= took as f64;
        took
    }
}

/// The smallest burst of a budget, in datagrams: a few milliseconds of the pace, and never
/// less than a small batch.
const MIN_BURST: f64 = 16.0;

/// How a batch is paced, the `kind` label of the catch-up metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Paced {
    /// Marked catch-up by its agent.
    CatchUp,
    /// From an agent older than the mark: paced as catch-up.
    OlderAgent,
}

impl Paced {
    pub(crate) const ALL: [Self; 2] = [Self::CatchUp, Self::OlderAgent];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::CatchUp => "catch_up",
            Self::OlderAgent => "older_agent",
        }
    }

    /// How `batch` is to be paced; `None`: it is live.
    pub(crate) fn of(batch: &pb::Batch) -> Option<Self> {
        match batch.timing() {
            pb::Timing::Live => None,
            pb::Timing::CatchUp => Some(Self::CatchUp),
            pb::Timing::Unspecified => Some(Self::OlderAgent),
        }
    }
}

impl CatchUp {
    /// A budget of `max_pps` datagrams a second (0: catch-up is not paced), with a burst of
    /// 4 ms of it (at least [`MIN_BURST`]): a collector's default socket buffer holds about
    /// 90 datagrams of 1,400 bytes.
    pub(crate) fn new(max_pps: u64) -> Self {
        let burst = (max_pps as f64 / 250.0).max(MIN_BURST);
        Self {
            max_pps,
            budget: Mutex::new(Debt::new(burst, Instant::now())),
        }
    }

    /// The most datagrams the pace lets go at once: catch-up batches are replayed in slices
    /// of this many.
    pub(crate) fn burst(&self) -> usize {
        if self.max_pps == 0 {
            return usize::MAX;
        }
        (self.max_pps as f64 / 250.0).max(MIN_BURST) as usize
    }

    /// How long a batch of `datagrams` paced as `paced` from a connection with `allowance`
    /// must wait before it is replayed (its tokens are taken now). A live batch never waits.
    pub(crate) fn wait_for(
        &self,
        paced: Option<Paced>,
        live_rate: u32,
        allowance: &Allowance,
        datagrams: u64,
    ) -> Duration {
        let Some(paced) = paced else {
            return Duration::ZERO;
        };
        if self.max_pps == 0 || datagrams == 0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let own = match paced {
            Paced::CatchUp => allowance.take(now, live_rate, datagrams),
            Paced::OlderAgent => 0,
        };
        let rest = datagrams - own;
        if rest == 0 {
            return Duration::ZERO;
        }
        self.budget.lock().unwrap_or_else(|p| p.into_inner()).take(
            now,
            self.max_pps as f64,
            rest as f64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catch_up(n: u64, live: u32) -> pb::Batch {
        pb::Batch {
            timing: pb::Timing::CatchUp.into(),
            live_datagrams_per_second: live,
            datagrams: vec![pb::Datagram::default(); n as usize],
            ..Default::default()
        }
    }

    #[test]
    fn live_batches_never_wait_and_older_agents_are_paced() {
        let pacer = CatchUp::new(1_000);
        let own = Allowance::default();
        let live = pb::Batch {
            timing: pb::Timing::Live.into(),
            ..Default::default()
        };
        assert_eq!(Paced::of(&live), None);
        for _ in 0..100 {
            assert_eq!(pacer.wait_for(None, 0, &own, 1_000), Duration::ZERO);
        }
        let older = pb::Batch::default();
        assert_eq!(Paced::of(&older), Some(Paced::OlderAgent));
        // The burst (16) goes at once, then 1,000 more owe a second.
        assert_eq!(
            pacer.wait_for(Some(Paced::OlderAgent), 5_000, &own, 16),
            Duration::ZERO
        );
        let wait = pacer.wait_for(Some(Paced::OlderAgent), 5_000, &own, 1_000);
        assert!(
            wait >= Duration::from_millis(990) && wait <= Duration::from_millis(1_000),
            "{wait:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn catch_up_drains_at_the_pace_plus_the_agents_live_rate() {
        let pacer = CatchUp::new(1_000);
        let own = Allowance::default();
        let batch = catch_up(10, 500);
        let paced = Paced::of(&batch);
        let start = Instant::now();
        let mut sent = 0u64;
        // Ten seconds of a backlog sent as fast as the pacer lets it.
        while start.elapsed() < Duration::from_secs(10) {
            let wait = pacer.wait_for(paced, batch.live_datagrams_per_second, &own, 10);
            tokio::time::sleep(wait).await;
            sent += 10;
        }
        // 1,000 + 500 a second, give or take a batch and a burst.
        assert!((14_900..=15_100).contains(&sent), "{sent}");
    }

    #[tokio::test(start_paused = true)]
    async fn agents_share_the_catch_up_budget_but_not_their_allowances() {
        let pacer = CatchUp::new(1_000);
        let (a, b) = (Allowance::default(), Allowance::default());
        let start = Instant::now();
        let (mut sent_a, mut sent_b) = (0u64, 0u64);
        let mut next_a = start;
        let mut next_b = start;
        while start.elapsed() < Duration::from_secs(10) {
            // Whichever connection may go first goes.
            if next_a <= next_b {
                tokio::time::sleep_until(next_a).await;
                next_a = Instant::now() + pacer.wait_for(Some(Paced::CatchUp), 0, &a, 10);
                sent_a += 10;
            } else {
                tokio::time::sleep_until(next_b).await;
                next_b = Instant::now() + pacer.wait_for(Some(Paced::CatchUp), 200, &b, 10);
                sent_b += 10;
            }
        }
        // Together: the shared pace plus b's live rate; and neither starves the other.
        let total = sent_a + sent_b;
        assert!((11_800..=12_200).contains(&total), "{sent_a} + {sent_b}");
        assert!(
            sent_a.min(sent_b) * 10 >= total * 4,
            "shared in turn: {sent_a} / {sent_b}"
        );
    }

    #[test]
    fn no_pace_means_no_wait() {
        let pacer = CatchUp::new(0);
        let own = Allowance::default();
        assert_eq!(
            pacer.wait_for(Some(Paced::CatchUp), 0, &own, 1_000_000),
            Duration::ZERO
        );
    }
}

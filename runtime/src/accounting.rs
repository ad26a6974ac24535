//! sFlow-aware loss accounting: the agent and the sink each follow the sequence numbers of
//! every sFlow stream (agent address, sub-agent) they pass on, without changing a byte, so that
//! a loss shows where it happened. Gaps the agent sees were lost before the relay (switch to
//! agent); gaps the sink sees but the agent did not were lost inside it.
//!
//! The sequence logic is `proto::sflow::SequenceTracker`'s; this module turns its observations
//! into Prometheus series, one set per stream up to a cap (`--sflow-max-streams`), the rest in
//! an `other` series. Datagrams that are not sFlow v5 are counted by reason; whether they are
//! relayed is the caller's business (the agent drops them unless `--accept any`, and adds a
//! reason of its own to the same family, [`SflowAccounting::not_sflow_reason`]).
//!
//! sFlow datagrams whose sample records run past their end (cut on the way, as by the original
//! `sflow_fwd.py`'s `recv(2048)`) are sFlow all the same: they count in their stream like any
//! other, and also in `{prefix}_sflow_truncated_datagrams_total`, with a warning
//! ([`Truncation`], at most one per 10 s); they are relayed as they are. The `--ssh-hex` mode,
//! which has no metrics, uses [`Truncation`] alone and reports the count in its summary.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use proto::sflow::{Header, NotSflow, SequenceTracker, Stream, is_truncated, parse_header};

use crate::observe::{counter_vec, gauge};
use crate::ratelimit::RateLimit;

/// The label value of the series shared by streams beyond the cap.
pub const OTHER: &str = "other";

/// Follows sFlow sequence numbers and counts what it sees under `{prefix}_sflow_*`.
#[derive(Debug)]
pub struct SflowAccounting {
    inner: Mutex<Inner>,
    families: Families,
    not_sflow_family: IntCounterVec,
    not_sflow: [IntCounter; NotSflow::ALL.len()],
    tracked: IntGauge,
    other: IntCounter,
    other_truncated: IntCounter,
    truncation: Truncation,
}

/// Spots sFlow datagrams cut short ([`is_truncated`]) and warns about them, one warning per
/// interval at most (with the count held back); the caller counts them.
#[derive(Debug)]
pub struct Truncation {
    reports: RateLimit,
}

#[derive(Debug)]
struct Inner {
    tracker: SequenceTracker,
    streams: Vec<Handles>,
}

#[derive(Debug)]
struct Families {
    datagrams: IntCounterVec,
    gaps: IntCounterVec,
    late: IntCounterVec,
    duplicates: IntCounterVec,
    resets: IntCounterVec,
    truncated: IntCounterVec,
}

/// One stream's series.
#[derive(Debug)]
struct Handles {
    datagrams: IntCounter,
    gaps: IntCounter,
    late: IntCounter,
    duplicates: IntCounter,
    resets: IntCounter,
    truncated: IntCounter,
}

impl SflowAccounting {
    /// Registers the families under `prefix` (`relay_agent`, `relay_sink`) in `registry`;
    /// follows at most `max_streams` streams one by one.
    ///
    /// # Panics
    ///
    /// When the families are already registered there.
    pub fn new(registry: &Registry, prefix: &str, max_streams: usize) -> Self {
        let labels = &["sflow_agent", "sub_agent"];
        let families = Families {
            datagrams: counter_vec(
                registry,
                &format!("{prefix}_sflow_datagrams_total"),
                "sFlow v5 datagrams seen, by sFlow stream (agent address in the datagram, sub-agent).",
                labels,
            ),
            gaps: counter_vec(
                registry,
                &format!("{prefix}_sflow_sequence_gaps_total"),
                "sFlow sequence numbers skipped: datagrams lost before this point (or arriving late, see _late_).",
                labels,
            ),
            late: counter_vec(
                registry,
                &format!("{prefix}_sflow_late_datagrams_total"),
                "sFlow datagrams that arrived behind a later sequence number (reordered, or duplicated).",
                labels,
            ),
            duplicates: counter_vec(
                registry,
                &format!("{prefix}_sflow_duplicate_datagrams_total"),
                "sFlow datagrams whose sequence number had already been seen.",
                labels,
            ),
            resets: counter_vec(
                registry,
                &format!("{prefix}_sflow_sequence_resets_total"),
                "Times an sFlow stream started over (its agent restarted, or the stream was replayed): a new baseline, no gap counted.",
                labels,
            ),
            truncated: counter_vec(
                registry,
                &format!("{prefix}_sflow_truncated_datagrams_total"),
                "sFlow datagrams whose samples run past their end (cut on the way, e.g. by a recv(2048)); relayed as they are.",
                labels,
            ),
        };
        let not_sflow = counter_vec(
            registry,
            &format!("{prefix}_not_sflow_datagrams_total"),
            "Datagrams that are not sFlow v5, by reason (too_short, version, address_type; the agent's source_not_allowed: from outside --allow-sources). The agent drops them unless --accept any.",
            &["reason"],
        );
        let other = families.datagrams.with_label_values(&[OTHER, OTHER]);
        let other_truncated = families.truncated.with_label_values(&[OTHER, OTHER]);
        Self {
            inner: Mutex::new(Inner {
                tracker: SequenceTracker::new(max_streams),
                streams: Vec::new(),
            }),
            not_sflow: NotSflow::ALL.map(|r| not_sflow.with_label_values(&[r.as_str()])),
            not_sflow_family: not_sflow,
            tracked: gauge(
                registry,
                &format!("{prefix}_sflow_streams"),
                "sFlow streams followed one by one (at most --sflow-max-streams).",
            ),
            other,
            other_truncated,
            truncation: Truncation::new(),
            families,
        }
    }

    /// The counter of `{prefix}_not_sflow_datagrams_total` for a reason of the caller's own
    /// (beside [`NotSflow`]'s), created now so that it is exported, at 0, from the start.
    pub fn not_sflow_reason(&self, reason: &str) -> IntCounter {
        self.not_sflow_family.with_label_values(&[reason])
    }

    /// Accounts for each of `datagrams`, in order.
    pub fn observe<'a>(&self, datagrams: impl IntoIterator<Item = &'a [u8]>) {
        self.observe_parsed(datagrams.into_iter().map(|d| (parse_header(d), d)));
    }

    /// Accounts for datagrams whose headers the caller has already read, in order, each with
    /// its bytes (to check that its samples fit): each `Err` counts under its reason.
    pub fn observe_parsed<'a>(
        &self,
        datagrams: impl IntoIterator<Item = (Result<Header, NotSflow>, &'a [u8])>,
    ) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (parsed, datagram) in datagrams {
            match parsed {
                Ok(header) => self.count(&mut inner, &header, datagram),
                Err(reason) => self.count_not_sflow(reason),
            }
        }
    }

    /// Accounts for one sFlow datagram.
    fn count(&self, inner: &mut Inner, header: &Header, datagram: &[u8]) {
        let Inner { tracker, streams } = inner;
        let seen = tracker.observe_header(header);
        let truncated = self.truncation.check(header, datagram);
        let id = match seen.stream {
            Stream::Tracked(id) => id,
            Stream::Other => {
                self.other.inc();
                if truncated {
                    self.other_truncated.inc();
                }
                return;
            }
            Stream::NotSflow(reason) => return self.count_not_sflow(reason),
        };
        if seen.new_stream {
            let key = tracker.key(id);
            let (agent, sub) = (key.agent.to_string(), key.sub_agent.to_string());
            let labels = [agent.as_str(), sub.as_str()];
            let f = &self.families;
            streams.push(Handles {
                datagrams: f.datagrams.with_label_values(&labels),
                gaps: f.gaps.with_label_values(&labels),
                late: f.late.with_label_values(&labels),
                duplicates: f.duplicates.with_label_values(&labels),
                resets: f.resets.with_label_values(&labels),
                truncated: f.truncated.with_label_values(&labels),
            });
            self.tracked.set(streams.len() as i64);
        }
        let Some(h) = streams.get(id.index()) else {
            return;
        };
        h.datagrams.inc();
        if seen.missing > 0 {
            h.gaps.inc_by(u64::from(seen.missing));
        }
        for (happened, counter) in [
            (seen.late, &h.late),
            (seen.duplicate, &h.duplicates),
            (seen.reset, &h.resets),
            (truncated, &h.truncated),
        ] {
            if happened {
                counter.inc();
            }
        }
    }

    fn count_not_sflow(&self, reason: NotSflow) {
        let i = NotSflow::ALL.iter().position(|&r| r == reason).unwrap_or(0);
        self.not_sflow[i].inc();
    }
}

// === impl Truncation ===

impl Default for Truncation {
    fn default() -> Self {
        Self::new()
    }
}

impl Truncation {
    /// One warning per 10 s at most.
    pub const fn new() -> Self {
        Self {
            reports: RateLimit::new(Duration::from_secs(10)),
        }
    }

    /// Whether `datagram`, whose header is `header`, was cut ([`is_truncated`]); warns when it
    /// was, unless a warning went out less than the interval ago.
    pub fn check(&self, header: &Header, datagram: &[u8]) -> bool {
        if !is_truncated(datagram) {
            return false;
        }
        if let Some(more) = self.reports.check() {
            tracing::warn!(
                sflow_agent = %header.agent,
                sub_agent = header.sub_agent,
                sequence = header.sequence,
                samples = header.samples,
                len = datagram.len(),
                earlier_truncations_not_logged = more,
                "sflow datagram truncated: its samples run past its end (cut on the way, e.g. by a recv(2048)); relayed as it is"
            );
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(agent: [u8; 4], sub_agent: u32, sequence: u32) -> Vec<u8> {
        Header {
            sub_agent,
            sequence,
            uptime_ms: 1_000 + sequence,
            ..Header::from_agent(agent.into())
        }
        .to_bytes()
    }

    fn value(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric())
            .find(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .map(|m| m.get_counter().get_value() as u64)
    }

    #[test]
    fn headers_read_by_the_caller_count_as_datagrams_and_own_reasons_exist_from_the_start() {
        let registry = Registry::new();
        let accounting = SflowAccounting::new(&registry, "test", 4);
        let own = accounting.not_sflow_reason("source_not_allowed");
        let reason = |r: &str| {
            value(
                &registry,
                "test_not_sflow_datagrams_total",
                &[("reason", r)],
            )
        };
        assert_eq!(reason("source_not_allowed"), Some(0));
        let bytes = [1, 2, 4].map(|seq| datagram([192, 0, 2, 1], 0, seq));
        let parsed = bytes.iter().map(|d| (parse_header(d), d.as_slice()));
        accounting.observe_parsed(parsed.chain([(Err(NotSflow::AddressType), &b"xyz"[..])]));
        own.inc_by(3);
        let a = [("sflow_agent", "192.0.2.1"), ("sub_agent", "0")];
        assert_eq!(value(&registry, "test_sflow_datagrams_total", &a), Some(3));
        assert_eq!(
            value(&registry, "test_sflow_sequence_gaps_total", &a),
            Some(1)
        );
        assert_eq!(reason("address_type"), Some(1));
        assert_eq!(reason("version"), Some(0));
        assert_eq!(reason("source_not_allowed"), Some(3));
    }

    #[test]
    fn a_cut_datagram_counts_in_its_stream_and_as_truncated() {
        let registry = Registry::new();
        let accounting = SflowAccounting::new(&registry, "test", 1);
        // One sample of 100 bytes announced; cut inside it.
        let whole = |agent: [u8; 4], sequence: u32| {
            let mut d = Header {
                sequence,
                samples: 1,
                ..Header::from_agent(agent.into())
            }
            .to_bytes();
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&92u32.to_be_bytes());
            d.extend_from_slice(&[0; 92]);
            d
        };
        let (a, b) = ([192, 0, 2, 1], [192, 0, 2, 2]);
        let datagrams = [whole(a, 1), whole(a, 2), whole(a, 3), whole(b, 1)];
        let cut = [
            &datagrams[0][..],
            &datagrams[1][..60],
            &datagrams[2][..],
            &datagrams[3][..60],
        ];
        accounting.observe(cut);
        let a = [("sflow_agent", "192.0.2.1"), ("sub_agent", "0")];
        assert_eq!(value(&registry, "test_sflow_datagrams_total", &a), Some(3));
        assert_eq!(
            value(&registry, "test_sflow_truncated_datagrams_total", &a),
            Some(1)
        );
        assert_eq!(
            value(&registry, "test_sflow_sequence_gaps_total", &a),
            Some(0)
        );
        // Beyond the cap, in the other series.
        let other = [("sflow_agent", OTHER)];
        assert_eq!(
            value(&registry, "test_sflow_truncated_datagrams_total", &other),
            Some(1)
        );
        assert!(!Truncation::new().check(&parse_header(&datagrams[0]).unwrap(), &datagrams[0]));
    }

    #[test]
    fn counts_gaps_per_stream_and_the_rest_apart() {
        let registry = Registry::new();
        let accounting = SflowAccounting::new(&registry, "test", 2);
        let mut all = Vec::new();
        for seq in [1, 2, 5, 6, 10] {
            all.push(datagram([192, 0, 2, 1], 0, seq));
        }
        for seq in [1, 2, 3] {
            all.push(datagram([192, 0, 2, 2], 7, seq));
        }
        all.push(datagram([192, 0, 2, 3], 0, 1)); // beyond the cap
        all.push(b"xy".to_vec()); // too short to be sFlow
        accounting.observe(all.iter().map(Vec::as_slice));

        let a = [("sflow_agent", "192.0.2.1"), ("sub_agent", "0")];
        let b = [("sflow_agent", "192.0.2.2"), ("sub_agent", "7")];
        assert_eq!(value(&registry, "test_sflow_datagrams_total", &a), Some(5));
        assert_eq!(
            value(&registry, "test_sflow_sequence_gaps_total", &a),
            Some(2 + 3)
        );
        assert_eq!(
            value(&registry, "test_sflow_sequence_gaps_total", &b),
            Some(0)
        );
        let other = [("sflow_agent", OTHER)];
        assert_eq!(
            value(&registry, "test_sflow_datagrams_total", &other),
            Some(1)
        );
        assert_eq!(
            value(
                &registry,
                "test_not_sflow_datagrams_total",
                &[("reason", "too_short")]
            ),
            Some(1)
        );
    }
}

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

use std::sync::Mutex;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use proto::sflow::{Header, NotSflow, SequenceTracker, Stream, parse_header};

use crate::observe::{counter_vec, gauge};

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
}

/// One stream's series.
#[derive(Debug)]
struct Handles {
    datagrams: IntCounter,
    gaps: IntCounter,
    late: IntCounter,
    duplicates: IntCounter,
    resets: IntCounter,
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
                "Times an sFlow stream started over (its agent restarted): a new baseline, no gap counted.",
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
        self.observe_parsed(datagrams.into_iter().map(parse_header));
    }

    /// Accounts for datagrams whose headers the caller has already read, in order: each
    /// `Err` counts under its reason.
    pub fn observe_parsed(&self, headers: impl IntoIterator<Item = Result<Header, NotSflow>>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Inner { tracker, streams } = &mut *inner;
        for parsed in headers {
            let seen = match parsed {
                Ok(header) => tracker.observe_header(&header),
                Err(reason) => {
                    self.count_not_sflow(reason);
                    continue;
                }
            };
            match seen.stream {
                Stream::Tracked(id) => {
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
                        });
                        self.tracked.set(streams.len() as i64);
                    }
                    let Some(h) = streams.get(id.index()) else {
                        continue;
                    };
                    h.datagrams.inc();
                    if seen.missing > 0 {
                        h.gaps.inc_by(u64::from(seen.missing));
                    }
                    if seen.late {
                        h.late.inc();
                    }
                    if seen.duplicate {
                        h.duplicates.inc();
                    }
                    if seen.reset {
                        h.resets.inc();
                    }
                }
                Stream::Other => self.other.inc(),
                Stream::NotSflow(reason) => self.count_not_sflow(reason),
            }
        }
    }

    fn count_not_sflow(&self, reason: NotSflow) {
        let i = NotSflow::ALL.iter().position(|&r| r == reason).unwrap_or(0);
        self.not_sflow[i].inc();
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
        let parsed = [1, 2, 4].map(|seq| parse_header(&datagram([192, 0, 2, 1], 0, seq)));
        accounting.observe_parsed(parsed.into_iter().chain([Err(NotSflow::AddressType)]));
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

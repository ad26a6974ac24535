//! sFlow interface counters as Prometheus metrics (`--sflow-metrics`): for each (sFlow
//! agent, ifIndex, site) the sink has seen counter samples of, counters Prometheus can
//! `rate()` and a few gauges, served at `/metrics/sflow` on the metrics listener.
//!
//! What each counter sample is: `proto::sflow::counters`'s (decoded without allocating).
//! What is done here, per interface:
//!
//! - **32-bit counters become 64-bit totals.** Each sample adds the difference from the
//!   previous one, modulo 2³² (or 2⁶⁴ for the 64-bit octet counters), so a wrap is a step
//!   forward. A total starts at the counter's value in the first sample seen, so it reads
//!   like the device's own counter, extended to 64 bits.
//! - **A restart is a reset Prometheus sees.** An agent whose uptime went back by more than
//!   [`RESTART_UPTIME_MS`], or a counter that went backwards, restarted: every total starts
//!   again at the sample's values, which are below the totals before.
//! - **Duplicates and reordered samples count once.** A sample whose sequence number is not
//!   ahead of the last one counted (the relay's resends are dropped before this, sFlow's own
//!   reordering here) changes nothing.
//! - **"Unknown" is never a number.** A counter an agent sends as all ones has no value; its
//!   series is left out until the agent sends one.
//! - **Bounded.** Interfaces not heard from for `--sflow-metrics-expiry` disappear. At most
//!   `--sflow-metrics-max-series` series are kept: a counter sample of a new interface that
//!   would go over is not taken, and its series are counted in
//!   `relay_sink_sflow_metrics_series_dropped_total`.
//!
//! Labels are `agent` (the sFlow agent address inside the datagram), `ifindex` and `site`
//! (the certificate name of the relay agent that carried it): nothing that changes with a
//! link's state.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, IntGauge};
use proto::pb;
use proto::sflow::RESTART_UPTIME_MS;
use proto::sflow::counters::{CounterSample, EthernetCounters, IfCounters, counter_samples};

/// Default of `--sflow-metrics-expiry`: an interface silent this long disappears (sFlow
/// agents send counters every 20 to 30 s, so 5 minutes is ten missed samples).
pub(crate) const DEFAULT_EXPIRY: Duration = Duration::from_secs(300);

/// Default of `--sflow-metrics-max-series`.
pub(crate) const DEFAULT_MAX_SERIES: usize = 100_000;

/// Half the `u32` number space: a sequence distance above it points backwards.
const HALF: u32 = 1 << 31;

/// The raw counters kept per interface, in the order of [`Raw::ALL`].
const RAW: usize = Raw::ALL.len();

/// One raw counter: its place, and whether the agent counts it in 32 bits.
#[derive(Debug, Clone, Copy)]
enum Raw {
    InOctets,
    OutOctets,
    InUcast,
    InMulticast,
    InBroadcast,
    OutUcast,
    OutMulticast,
    OutBroadcast,
    InDiscards,
    InErrors,
    OutDiscards,
    OutErrors,
    FcsErrors,
    AlignmentErrors,
    SymbolErrors,
    FrameTooLongs,
}

impl Raw {
    /// Every raw counter, in declaration order (so `raw as usize` is its place).
    const ALL: [Self; 16] = [
        Self::InOctets,
        Self::OutOctets,
        Self::InUcast,
        Self::InMulticast,
        Self::InBroadcast,
        Self::OutUcast,
        Self::OutMulticast,
        Self::OutBroadcast,
        Self::InDiscards,
        Self::InErrors,
        Self::OutDiscards,
        Self::OutErrors,
        Self::FcsErrors,
        Self::AlignmentErrors,
        Self::SymbolErrors,
        Self::FrameTooLongs,
    ];

    /// The 64-bit ones (the octet counters); the rest wrap at 2³².
    fn is_64(self) -> bool {
        matches!(self, Self::InOctets | Self::OutOctets)
    }

    /// This counter's value in a sample's records, `None` where unknown or not sent.
    fn value(
        self,
        generic: Option<&IfCounters>,
        ethernet: Option<&EthernetCounters>,
    ) -> Option<u64> {
        let g = |f: fn(&IfCounters) -> Option<u32>| generic.and_then(f).map(u64::from);
        let e = |f: fn(&EthernetCounters) -> Option<u32>| ethernet.and_then(f).map(u64::from);
        match self {
            Self::InOctets => generic.and_then(|c| c.in_octets),
            Self::OutOctets => generic.and_then(|c| c.out_octets),
            Self::InUcast => g(|c| c.in_ucast_pkts),
            Self::InMulticast => g(|c| c.in_multicast_pkts),
            Self::InBroadcast => g(|c| c.in_broadcast_pkts),
            Self::OutUcast => g(|c| c.out_ucast_pkts),
            Self::OutMulticast => g(|c| c.out_multicast_pkts),
            Self::OutBroadcast => g(|c| c.out_broadcast_pkts),
            Self::InDiscards => g(|c| c.in_discards),
            Self::InErrors => g(|c| c.in_errors),
            Self::OutDiscards => g(|c| c.out_discards),
            Self::OutErrors => g(|c| c.out_errors),
            Self::FcsErrors => e(|c| c.fcs_errors),
            Self::AlignmentErrors => e(|c| c.alignment_errors),
            Self::SymbolErrors => e(|c| c.symbol_errors),
            Self::FrameTooLongs => e(|c| c.frame_too_longs),
        }
    }
}

/// An exported counter family: its name, help, and the raw counters it adds up.
struct Family {
    name: &'static str,
    help: &'static str,
    sum: &'static [Raw],
}

/// Every counter family, in exposition order.
const COUNTERS: [Family; 12] = [
    Family {
        name: "sflow_if_in_octets_total",
        help: "Octets received on the interface (ifInOctets, 64-bit).",
        sum: &[Raw::InOctets],
    },
    Family {
        name: "sflow_if_out_octets_total",
        help: "Octets sent on the interface (ifOutOctets, 64-bit).",
        sum: &[Raw::OutOctets],
    },
    Family {
        name: "sflow_if_in_packets_total",
        help: "Packets received: unicast, multicast and broadcast (the ones the agent counts).",
        sum: &[Raw::InUcast, Raw::InMulticast, Raw::InBroadcast],
    },
    Family {
        name: "sflow_if_out_packets_total",
        help: "Packets sent: unicast, multicast and broadcast (the ones the agent counts).",
        sum: &[Raw::OutUcast, Raw::OutMulticast, Raw::OutBroadcast],
    },
    Family {
        name: "sflow_if_in_errors_total",
        help: "Inbound packets with errors (ifInErrors), 32-bit counter extended to 64.",
        sum: &[Raw::InErrors],
    },
    Family {
        name: "sflow_if_out_errors_total",
        help: "Outbound packets not sent for errors (ifOutErrors).",
        sum: &[Raw::OutErrors],
    },
    Family {
        name: "sflow_if_in_discards_total",
        help: "Inbound packets discarded without error (ifInDiscards), such as for lack of buffer.",
        sum: &[Raw::InDiscards],
    },
    Family {
        name: "sflow_if_out_discards_total",
        help: "Outbound packets discarded without error (ifOutDiscards), such as queue drops.",
        sum: &[Raw::OutDiscards],
    },
    Family {
        name: "sflow_if_fcs_errors_total",
        help: "Ethernet frames received with a bad frame check sequence (dot3StatsFCSErrors).",
        sum: &[Raw::FcsErrors],
    },
    Family {
        name: "sflow_if_alignment_errors_total",
        help: "Ethernet frames received not a whole number of octets (dot3StatsAlignmentErrors).",
        sum: &[Raw::AlignmentErrors],
    },
    Family {
        name: "sflow_if_symbol_errors_total",
        help: "Ethernet symbol errors (dot3StatsSymbolErrors).",
        sum: &[Raw::SymbolErrors],
    },
    Family {
        name: "sflow_if_frame_too_long_total",
        help: "Ethernet frames received over the maximum size (dot3StatsFrameTooLongs).",
        sum: &[Raw::FrameTooLongs],
    },
];

/// Gauges per interface (speed, admin and oper state, last sample time).
const GAUGES: usize = 4;

/// The raw values of one sample, in the order of [`Raw::ALL`].
fn raw_values(
    generic: Option<&IfCounters>,
    ethernet: Option<&EthernetCounters>,
) -> [Option<u64>; RAW] {
    Raw::ALL.map(|raw| raw.value(generic, ethernet))
}

/// An interface, as the exposition names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    agent: IpAddr,
    if_index: u32,
    site: Arc<str>,
}

/// One raw counter of an interface: its 64-bit total and the last value it was read at.
#[derive(Debug, Clone, Copy, Default)]
struct Counter {
    total: u64,
    last: Option<u64>,
}

/// What is kept of an interface.
#[derive(Debug, Clone)]
struct Interface {
    /// When a sample of it last arrived (for the expiry).
    seen: Instant,
    /// That sample's time, Unix seconds.
    sampled_unix: f64,
    /// The agent's uptime and the counter sample's sequence number of the last sample taken.
    uptime_ms: u32,
    sequence: u32,
    speed: Option<u64>,
    admin_up: Option<bool>,
    oper_up: Option<bool>,
    counters: [Counter; RAW],
}

/// What a sample did to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// The first sample of a new interface.
    New,
    /// A newer sample: its differences were added.
    Next,
    /// The agent restarted: the totals start again.
    Reset,
    /// Not ahead of the last one taken: a duplicate, or reordered.
    Stale,
    /// A new interface over the series limit.
    Refused,
}

/// The table of interfaces, and the limits it keeps to.
#[derive(Debug)]
pub(crate) struct SflowMetrics {
    table: Mutex<Table>,
    expiry: Duration,
    max_series: usize,
    /// `relay_sink_sflow_metrics_series_dropped_total`.
    series_dropped: IntCounter,
    /// `relay_sink_sflow_metrics_series`.
    series_gauge: IntGauge,
    full: runtime::ratelimit::RateLimit,
}

#[derive(Debug, Default)]
struct Table {
    interfaces: HashMap<Key, Interface>,
    /// Series the interfaces export now.
    series: usize,
}

impl Interface {
    fn new(sample: &Sample<'_>, raw: &[Option<u64>; RAW]) -> Self {
        let mut counters = [Counter::default(); RAW];
        for (counter, value) in counters.iter_mut().zip(raw) {
            *counter = Counter {
                total: value.unwrap_or(0),
                last: *value,
            };
        }
        let mut interface = Self {
            seen: sample.now,
            sampled_unix: sample.unix,
            uptime_ms: sample.uptime_ms,
            sequence: sample.counters.sequence,
            speed: None,
            admin_up: None,
            oper_up: None,
            counters,
        };
        interface.set_gauges(sample.counters.generic.as_ref());
        interface
    }

    fn set_gauges(&mut self, generic: Option<&IfCounters>) {
        if let Some(generic) = generic {
            self.speed = generic.if_speed;
            self.admin_up = Some(generic.admin_up());
            self.oper_up = Some(generic.oper_up());
        }
    }

    /// The series this interface exports.
    fn series(&self) -> usize {
        let counters = COUNTERS
            .iter()
            .filter(|family| {
                family
                    .sum
                    .iter()
                    .any(|raw| self.counters[*raw as usize].last.is_some())
            })
            .count();
        let gauges = 1 + [
            self.speed.is_some(),
            self.admin_up.is_some(),
            self.oper_up.is_some(),
        ]
        .iter()
        .filter(|known| **known)
        .count();
        counters + gauges
    }

    /// Takes a newer sample (or sees it is not newer).
    fn take(&mut self, sample: &Sample<'_>, raw: &[Option<u64>; RAW]) -> Taken {
        let uptime_back = self.uptime_ms.wrapping_sub(sample.uptime_ms);
        let restarted = (RESTART_UPTIME_MS + 1..=HALF).contains(&uptime_back);
        let ahead = sample.counters.sequence.wrapping_sub(self.sequence);
        if !restarted && !(1..HALF).contains(&ahead) {
            self.seen = sample.now;
            return Taken::Stale;
        }
        let went_back =
            Raw::ALL
                .iter()
                .zip(raw)
                .zip(&self.counters)
                .any(|((kind, now), counter)| match (counter.last, now) {
                    (Some(last), Some(now)) => went_backwards(*kind, last, *now),
                    _ => false,
                });
        if restarted || went_back {
            *self = Self::new(sample, raw);
            return Taken::Reset;
        }
        for ((kind, now), counter) in Raw::ALL.iter().zip(raw).zip(self.counters.iter_mut()) {
            let Some(now) = *now else { continue };
            counter.total = match counter.last {
                Some(last) => counter.total.wrapping_add(difference(*kind, last, now)),
                // Known from now on: a total that starts here.
                None => now,
            };
            counter.last = Some(now);
        }
        self.seen = sample.now;
        self.sampled_unix = sample.unix;
        self.uptime_ms = sample.uptime_ms;
        self.sequence = sample.counters.sequence;
        self.set_gauges(sample.counters.generic.as_ref());
        Taken::Next
    }
}

/// How far a counter went from `last` to `now`, modulo its width.
fn difference(kind: Raw, last: u64, now: u64) -> u64 {
    if kind.is_64() {
        now.wrapping_sub(last)
    } else {
        u64::from((now as u32).wrapping_sub(last as u32))
    }
}

/// Whether a counter went backwards rather than on (a difference of more than half its
/// width is a step back, not a wrap: no interface counts that much between two samples).
fn went_backwards(kind: Raw, last: u64, now: u64) -> bool {
    if kind.is_64() {
        now.wrapping_sub(last) > u64::MAX / 2
    } else {
        (now as u32).wrapping_sub(last as u32) > HALF
    }
}

/// A counter sample, with what came with it.
struct Sample<'a> {
    counters: &'a CounterSample,
    uptime_ms: u32,
    now: Instant,
    unix: f64,
}

impl SflowMetrics {
    /// An empty table with its limits; its own counters are registered in `registry`.
    pub(crate) fn new(
        registry: &prometheus::Registry,
        expiry: Duration,
        max_series: usize,
    ) -> Self {
        Self {
            table: Mutex::default(),
            expiry,
            max_series,
            series_dropped: runtime::observe::counter(
                registry,
                "relay_sink_sflow_metrics_series_dropped_total",
                "Series of sFlow interface counters not exported: counter samples of new interfaces beyond --sflow-metrics-max-series, counted with the series each would have added.",
            ),
            series_gauge: runtime::observe::gauge(
                registry,
                "relay_sink_sflow_metrics_series",
                "Series of sFlow interface counters exported at /metrics/sflow now.",
            ),
            full: runtime::ratelimit::RateLimit::new(Duration::from_secs(60)),
        }
    }

    /// Takes the counter samples of `datagrams`, carried by the relay agent `site`.
    pub(crate) fn observe(&self, site: &Arc<str>, datagrams: &[pb::Datagram]) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut table = None;
        for datagram in datagrams {
            let Ok(mut samples) = counter_samples(&datagram.payload) else {
                continue;
            };
            let header = *samples.header();
            let unix = match datagram.received_unix_nanos {
                0 => wall
                    .duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
                nanos => nanos as f64 / 1e9,
            };
            for counters in samples.by_ref().map_while(Result::ok) {
                let Some(if_index) = counters.generic.as_ref().map_or(
                    (counters.ethernet.is_some() && counters.source_id_type == 0)
                        .then_some(counters.source_id_index),
                    |generic| Some(generic.if_index),
                ) else {
                    continue;
                };
                let sample = Sample {
                    counters: &counters,
                    uptime_ms: header.uptime_ms,
                    now,
                    unix,
                };
                let key = Key {
                    agent: header.agent,
                    if_index,
                    site: site.clone(),
                };
                let table = table.get_or_insert_with(|| self.lock());
                self.take(table, key, &sample);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one sample into `table`.
    fn take(&self, table: &mut Table, key: Key, sample: &Sample<'_>) -> Taken {
        let raw = raw_values(
            sample.counters.generic.as_ref(),
            sample.counters.ethernet.as_ref(),
        );
        if let Some(interface) = table.interfaces.get_mut(&key) {
            let before = interface.series();
            let taken = interface.take(sample, &raw);
            table.series = table.series + interface.series() - before;
            return taken;
        }
        let interface = Interface::new(sample, &raw);
        let series = interface.series();
        if table.series + series > self.max_series {
            self.expire(table, sample.now);
        }
        if table.series + series > self.max_series {
            self.series_dropped.inc_by(series as u64);
            if let Some(more) = self.full.check() {
                tracing::warn!(
                    agent = %key.agent,
                    ifindex = key.if_index,
                    site = %key.site,
                    max_series = self.max_series,
                    earlier_refusals_not_logged = more,
                    "sFlow interface metrics are at --sflow-metrics-max-series: a new interface is not exported"
                );
            }
            return Taken::Refused;
        }
        table.series += series;
        table.interfaces.insert(key, interface);
        Taken::New
    }

    /// Drops the interfaces not heard from for the expiry.
    fn expire(&self, table: &mut Table, now: Instant) {
        let expiry = self.expiry;
        let mut gone = 0;
        table.interfaces.retain(|_, interface| {
            let keep = now.saturating_duration_since(interface.seen) < expiry;
            if !keep {
                gone += interface.series();
            }
            keep
        });
        table.series -= gone;
    }

    /// The exposition of `/metrics/sflow`, in the Prometheus text format (version 0.0.4).
    pub(crate) fn render(&self) -> String {
        let mut table = self.lock();
        self.expire(&mut table, Instant::now());
        self.series_gauge
            .set(i64::try_from(table.series).unwrap_or(i64::MAX));
        let mut interfaces: Vec<(&Key, &Interface)> = table.interfaces.iter().collect();
        interfaces.sort_unstable_by(|a, b| {
            (a.0.site.as_ref(), a.0.agent, a.0.if_index).cmp(&(
                b.0.site.as_ref(),
                b.0.agent,
                b.0.if_index,
            ))
        });
        let mut out = String::with_capacity(table.series * 96);
        let labels: Vec<String> = interfaces.iter().map(|(key, _)| labels(key)).collect();
        let rows = || {
            interfaces
                .iter()
                .map(|(_, interface)| *interface)
                .zip(&labels)
        };
        for family in &COUNTERS {
            let series = rows().filter_map(|(interface, labels)| {
                Some((labels, Value::Int(interface.total_of(family.sum)?)))
            });
            write_family(&mut out, family.name, family.help, "counter", series);
        }
        for (name, help, value) in GAUGE_FAMILIES {
            let series = rows().filter_map(|(interface, labels)| Some((labels, value(interface)?)));
            write_family(&mut out, name, help, "gauge", series);
        }
        out
    }
}

/// A sample's value: counters exactly, gauges as floats.
#[derive(Debug, Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Int(n) => write!(f, "{n}"),
            Self::Float(x) => write!(f, "{x}"),
        }
    }
}

/// The gauge families: name, help, and the value of an interface (none: no series).
type GaugeOf = fn(&Interface) -> Option<Value>;
const GAUGE_FAMILIES: [(&str, &str, GaugeOf); GAUGES] = [
    (
        "sflow_if_speed_bps",
        "Interface speed, bits a second (ifSpeed); absent when the agent does not know it.",
        |i| i.speed.map(Value::Int),
    ),
    (
        "sflow_if_admin_up",
        "1 when the interface is administratively up (ifAdminStatus), else 0.",
        |i| i.admin_up.map(|up| Value::Int(u64::from(up))),
    ),
    (
        "sflow_if_oper_up",
        "1 when the interface is operationally up (ifOperStatus), else 0.",
        |i| i.oper_up.map(|up| Value::Int(u64::from(up))),
    ),
    (
        "sflow_if_last_sample_timestamp_seconds",
        "When the interface's last counter sample was received, Unix seconds.",
        |i| Some(Value::Float(i.sampled_unix)),
    ),
];

impl Interface {
    /// The sum of the totals of `raws` the agent counts; `None` when it counts none of them.
    fn total_of(&self, raws: &[Raw]) -> Option<u64> {
        let known = raws.iter().map(|raw| self.counters[*raw as usize]);
        known
            .filter(|counter| counter.last.is_some())
            .map(|counter| counter.total)
            .reduce(u64::wrapping_add)
    }
}

/// `{agent="…",ifindex="…",site="…"}`, the site escaped as the text format wants.
fn labels(key: &Key) -> String {
    let mut site = String::with_capacity(key.site.len());
    for c in key.site.chars() {
        match c {
            '\\' => site.push_str("\\\\"),
            '"' => site.push_str("\\\""),
            '\n' => site.push_str("\\n"),
            c => site.push(c),
        }
    }
    format!(
        "{{agent=\"{}\",ifindex=\"{}\",site=\"{site}\"}}",
        key.agent, key.if_index
    )
}

/// One family: `# HELP`, `# TYPE` and a line per series (none at all without series).
fn write_family<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    kind: &str,
    series: impl Iterator<Item = (&'a String, Value)>,
) {
    let mut series = series.peekable();
    if series.peek().is_none() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in series {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

#[cfg(test)]
mod tests;
